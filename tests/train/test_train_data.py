"""Data: documents, chat loss masks, shards, windows, and clear errors on bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llmos.errors import LlmosError
from llmos.train.bpe import EOT, IM_END, load_tokenizer, train_tokenizer
from llmos.train.data import Document, Shards, Windows, encode_document, iter_documents, prepare_data


@pytest.fixture(scope="module")
def tok(tokenizer_file):
    return load_tokenizer(tokenizer_file)


def test_trained_tokenizer_has_chat_specials_and_round_trips(tok, tokenizer_file):
    assert tok.token_to_id(EOT) == 0 and tok.token_to_id("<|im_start|>") == 1 and tok.token_to_id(IM_END) == 2
    assert tok.eos_id == 0 and 2 in tok.stop_ids and tok.vocab_size == 512
    text = "The Zorblax pump P-117 — naïve 日本 text survives: 42!"
    assert tok.decode(tok.encode(text)) == text  # byte-level: any text encodes
    assert tok.encode("a<|im_end|>b", add_special_tokens=False)[1] == 2
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]).endswith("<|im_start|>assistant\n")


def test_text_documents_end_with_eos_and_train_on_everything(tok):
    ids, mask = encode_document(Document("x", text="The cat sees the sky."), tok)
    assert ids[-1] == tok.eos_id and ids.count(tok.eos_id) == 1
    assert mask == [1] * len(ids)


def test_chat_sft_masks_everything_but_assistant_turns(tok):
    messages = [
        {"role": "system", "content": "You add numbers."},
        {"role": "user", "content": "What is 2 plus 3?"},
        {"role": "assistant", "content": "2 plus 3 is 5."},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You are welcome."},
    ]
    ids, mask = encode_document(Document("x", messages=messages), tok)
    assert len(ids) == len(mask)
    # The whole conversation is there, exactly as the template renders it.
    assert tok.decode(ids) == tok.apply_chat_template(messages, add_generation_prompt=False) + EOT
    # Trained tokens are the assistant turns (text + end of turn), nothing else.
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    assert trained == "2 plus 3 is 5.<|im_end|>\nYou are welcome.<|im_end|>\n"
    # Every masked run is context: system, user and the assistant headers.
    context = tok.decode([i for i, m in zip(ids, mask) if not m])
    assert "You add numbers." in context and "What is 2 plus 3?" in context and "Thanks!" in context
    assert context.count("<|im_start|>assistant\n") == 2 and "is 5" not in context
    assert mask[-1] == 0 and ids[-1] == tok.eos_id  # the appended boundary is not a target


def test_chat_shards_carry_the_mask(tok, chat_jsonl, tmp_path):
    shards = prepare_data([chat_jsonl], tok, tmp_path / "d", val_fraction=0.2, min_tokens=33)
    assert shards.masked
    for split in ("train", "val"):
        tokens, mask = np.asarray(shards.tokens(split)), np.asarray(shards.mask(split))
        assert len(tokens) == len(mask) == shards.counts[split] > 0
        assert 0 < mask.mean() < 1
    # A batch's loss weights are the mask shifted onto the targets.
    w = Windows(shards.tokens("train"), shards.mask("train"), 32)
    x, y, m = w.rows([0])
    assert (x[0, 1:] == y[0, :-1]).all()
    assert m[0].tolist() == [float(v) for v in np.asarray(shards.mask("train"))[1:33]]


def test_shards_split_by_document_and_are_reused(tok, corpus_dir, tmp_path):
    shards = prepare_data([corpus_dir], tok, tmp_path / "d", val_fraction=0.1, seed=3, min_tokens=65)
    train, val = np.asarray(shards.tokens("train")), np.asarray(shards.tokens("val"))
    assert not shards.masked and shards.mask("train") is None
    assert abs(len(val) / (len(train) + len(val)) - 0.1) < 0.09
    assert train.dtype == np.uint16
    mtime = (tmp_path / "d" / "train.bin").stat().st_mtime_ns
    again = prepare_data([corpus_dir], tok, tmp_path / "d", val_fraction=0.1, seed=3, min_tokens=65)
    assert again.counts == shards.counts and (tmp_path / "d" / "train.bin").stat().st_mtime_ns == mtime
    assert Shards.open(tmp_path / "d").counts == shards.counts


def test_window_order_is_seeded_and_covers_every_window(tok, corpus_dir, tmp_path):
    shards = prepare_data([corpus_dir], tok, tmp_path / "d", min_tokens=65)
    a = Windows(shards.tokens("train"), None, 64, seed=5)
    b = Windows(shards.tokens("train"), None, 64, seed=5)
    epoch = [a.index(p) for p in range(a.n)]
    assert sorted(epoch) == list(range(a.n))
    assert [b.index(p) for p in range(a.n)] == epoch
    assert [a.index(p) for p in range(a.n, 2 * a.n)] != epoch  # a new order each epoch
    assert (a.batch(7, 4)[0] == b.batch(7, 4)[0]).all()


# --- bad input ----------------------------------------------------------------------------------

def _error(paths) -> str:
    with pytest.raises(LlmosError) as info:
        list(iter_documents(paths))
    return str(info.value)


def test_empty_data_is_refused(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n\n")
    assert "no text found" in _error([tmp_path / "empty.txt"])
    (tmp_path / "folder").mkdir()
    assert "empty folder" in _error([tmp_path / "folder"])
    assert "no such file" in _error([tmp_path / "missing.txt"])


def test_binary_data_is_refused_naming_the_file(tmp_path):
    blob = tmp_path / "weights.bin"
    blob.write_bytes(bytes(range(256)) * 4)
    msg = _error([blob])
    assert str(blob) in msg and "binary" in msg
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("first line\ncaf\xe9\n".encode("latin-1"))
    msg = _error([latin])
    assert f"{latin}:2" in msg and "UTF-8" in msg


def test_invalid_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n\n" + '{"text": "broken\n' + json.dumps({"text": "x"}) + "\n")
    msg = _error([path])
    assert f"{path}:3" in msg and "not valid JSON" in msg
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"prompt": "no"}) + "\n")
    assert f"{path}:2" in _error([path])
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    assert f"{path}:1" in _error([path]) and "no assistant" in _error([path])
    path.write_text(json.dumps({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}) + "\n")
    assert "messages[0]" in _error([path])


def test_too_little_data_for_one_window(tok, tmp_path):
    (tmp_path / "short.txt").write_text("One short line.")
    with pytest.raises(LlmosError, match="too little data"):
        prepare_data([tmp_path / "short.txt"], tok, tmp_path / "d", min_tokens=257)


def test_tokenizer_training_refuses_tiny_vocabularies(corpus_dir, tmp_path):
    with pytest.raises(LlmosError, match="at least"):
        train_tokenizer([corpus_dir], 100, tmp_path / "t.json")
