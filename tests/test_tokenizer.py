"""Tokenizer parity with transformers (GGUF and Hugging Face folders), chat templates, and the
streaming decoder's invariants. transformers and gguf are references here, never imported by llmos."""

from __future__ import annotations

import itertools
import json
import os
import random
from pathlib import Path

import gguf
import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, trainers

from llmos.errors import LlmosError
from llmos.tokenizer import IncrementalDecoder, Tokenizer, TokenizerError
import sentencepiece_fields
from sentencepiece_fields import CORPUS as SPM_CORPUS

TEXTS = [
    "Hello, world! How are you today?",
    "你好，世界！今天天气很好，我们去公园散步吧。",
    "日本語のテキストと한국어 텍스트, Ελληνικά, русский текст",
    "def add(a, b):\n    return a + b  # sum\n",
    "for (int i = 0; i < n; ++i) { x[i] *= 2; } // C++\n",
    "emoji: 😀 🎉 👨‍👩‍👧‍👦 🇫🇷 ✔️ 🦙",
    "tabs\tand\t\tmore\ttabs",
    "many     spaces   here  ",
    "trailing newlines\n\n\n",
    "windows\r\nline\r\nendings\r\n",
    "  leading spaces",
    "digits 1234567890123 and 3.14159265 and 1,000,000 and 2024-01-31",
    "don't won't I'LL WE'VE she's they'RE I'd",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text",
    "Ünïcödé naïve café résumé Straße",
    "",
    " ",
    "\n",
]
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another, in 中文?"},
    ],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! 😀"},
        {"role": "user", "content": "Bye"},
    ],
]


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def metadata(default_gguf_path: str) -> dict:
    reader = gguf.GGUFReader(default_gguf_path)
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


@pytest.fixture(scope="module")
def tok(metadata: dict) -> Tokenizer:
    return Tokenizer.from_gguf(metadata)


def _hf_from_gguf(path: str):
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(Path(path).parent), gguf_file=Path(path).name)


@pytest.fixture(scope="module")
def hf(default_gguf_path: str):
    return _hf_from_gguf(default_gguf_path)


def _write_tokenizer_gguf(path: Path, fields: dict) -> str:
    """A GGUF holding only tokenizer metadata, so transformers can build its reference from it."""
    writer = gguf.GGUFWriter(str(path), fields.get("general.architecture", "llama"))
    writer.add_tokenizer_model(fields["tokenizer.ggml.model"])
    if "tokenizer.ggml.pre" in fields:
        writer.add_tokenizer_pre(fields["tokenizer.ggml.pre"])
    writer.add_token_list(fields["tokenizer.ggml.tokens"])
    writer.add_token_types(fields["tokenizer.ggml.token_type"])
    if "tokenizer.ggml.merges" in fields:
        writer.add_token_merges(fields["tokenizer.ggml.merges"])
    if "tokenizer.ggml.scores" in fields:
        writer.add_token_scores(fields["tokenizer.ggml.scores"])
    writer.add_bos_token_id(fields["tokenizer.ggml.bos_token_id"])
    writer.add_eos_token_id(fields["tokenizer.ggml.eos_token_id"])
    if "tokenizer.ggml.unknown_token_id" in fields:
        writer.add_unk_token_id(fields["tokenizer.ggml.unknown_token_id"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


# --- GGUF: ids and text match transformers ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS)
def test_gguf_ids_match_transformers(tok: Tokenizer, hf, text: str) -> None:
    assert tok.encode(text) == hf.encode(text, add_special_tokens=True)
    assert tok.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS)
def test_gguf_decode_round_trips(tok: Tokenizer, hf, text: str) -> None:
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(ids) == hf.decode(ids)
    assert tok.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)


def test_gguf_special_tokens(tok: Tokenizer, metadata: dict) -> None:
    im_end = metadata["tokenizer.ggml.tokens"].index("<|im_end|>")
    assert tok.vocab_size == len(metadata["tokenizer.ggml.tokens"]) == 49152
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
    assert {2, im_end} <= tok.stop_ids
    assert 0 in tok.stop_ids  # <|endoftext|> ends text for SmolLM2's base model too, as in llama.cpp
    assert tok.special_ids == frozenset(range(17))
    # Special tokens written in the text are single ids; BOS is not added (add_bos_token is false).
    assert tok.encode("<|im_start|>user\nhi<|im_end|>") == [1, 4093, 198, 6004, 2]
    assert tok.id_to_token(1) == tok.token_to_str(1) == "<|im_start|>"
    assert tok.id_to_token(tok.encode(" the")[0]) == "Ġthe"
    assert tok.token_to_id("<|im_end|>") == im_end
    assert tok.decode([1, 4093, 2], skip_special_tokens=True) == "user"


def test_gguf_bos_and_eos_follow_metadata(metadata: dict) -> None:
    with_bos = Tokenizer.from_gguf(
        {**metadata, "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": True}
    )
    assert with_bos.encode("hi") == [1, *with_bos.encode("hi", add_special_tokens=False), 2]
    # Without the key, llama.cpp's default for the pre-tokenizer applies: no BOS for smollm, BOS for llama3.
    no_key = {k: v for k, v in metadata.items() if k != "tokenizer.ggml.add_bos_token"}
    assert Tokenizer.from_gguf(no_key).encode("hi")[0] != 1
    assert Tokenizer.from_gguf({**no_key, "tokenizer.ggml.pre": "llama-bpe"}).encode("hi")[0] == 1


def test_smollm_splits_every_digit(tok: Tokenizer) -> None:
    # llama.cpp's smollm pre-tokenizer (and SmolLM2's own tokenizer.json, Digits(individual_digits))
    # cut every \p{N} character alone, Arabic-Indic digits included. transformers' GGUF converter does
    # not know "smollm" and keeps " ١" together, so this case is checked on its own.
    pieces = ["x", " ", "١", "٢", "٣", " ", "4", "5"]
    assert tok.encode("x ١٢٣ 45") == [i for piece in pieces for i in tok.encode(piece)]


@pytest.mark.slow
@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "gpt-2"])
def test_other_pre_tokenizers_match_transformers(metadata: dict, tmp_path: Path, pre: str) -> None:
    fields = {**metadata, "tokenizer.ggml.pre": pre, "tokenizer.ggml.add_bos_token": False}
    reference = _hf_from_gguf(_write_tokenizer_gguf(tmp_path / "t.gguf", fields))
    ours = Tokenizer.from_gguf(fields)
    for text in TEXTS:
        if not any(c.isdigit() for c in text):  # SmolLM2's vocabulary has no multi-digit pieces either way
            assert ours.encode(text, add_special_tokens=False) == reference.encode(text, add_special_tokens=False), text


def test_pre_tokenizer_is_chosen_by_metadata(metadata: dict) -> None:
    def encode(pre: str, text: str) -> list[int]:
        return Tokenizer.from_gguf({**metadata, "tokenizer.ggml.pre": pre}).encode(text)

    # llama3/qwen2 keep a run of newlines whole ("\s*[\r\n]+"); gpt-2 leaves the last one to the next word.
    assert encode("llama-bpe", "a\n\nb") == encode("qwen2", "a\n\nb") != encode("gpt-2", "a\n\nb")
    assert encode("smollm", "x \u0661") != encode("gpt-2", "x \u0661")  # smollm cuts every digit alone


def test_unsupported_gguf_tokenizers_are_refused(metadata: dict) -> None:
    with pytest.raises(TokenizerError, match="'bert' is not supported"):
        Tokenizer.from_gguf({**metadata, "tokenizer.ggml.model": "bert"})
    with pytest.raises(TokenizerError, match="pre-tokenizer 'no-such-pre' is not supported"):
        Tokenizer.from_gguf({**metadata, "tokenizer.ggml.pre": "no-such-pre"})
    with pytest.raises(TokenizerError, match="no tokenizer"):
        Tokenizer.from_gguf({"general.architecture": "llama"})
    with pytest.raises(TokenizerError, match="merges do not match"):
        Tokenizer.from_gguf({**metadata, "tokenizer.ggml.merges": ["notatoken x"]})
    assert issubclass(TokenizerError, LlmosError) and issubclass(TokenizerError, ValueError)


def test_decode_rejects_ids_outside_the_vocabulary(tok: Tokenizer) -> None:
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.decode([5, tok.vocab_size])
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.id_to_token(-1)
    with pytest.raises(TokenizerError, match="takes a str"):
        tok.encode(b"bytes")  # type: ignore[arg-type]


# --- SentencePiece ("llama") GGUF vocabularies --------------------------------------------------

@pytest.fixture(scope="module")
def spm_fields() -> dict:
    return sentencepiece_fields.llama()


SPM_TEXTS = ["Hello world", "The lazy dog jumps.", "crème brûlée, Zürich", "a  b   c\nnew line", "日本 🦙 unk", "x"]


def test_sentencepiece_gguf_matches_transformers(spm_fields: dict, tmp_path: Path) -> None:
    reference = _hf_from_gguf(_write_tokenizer_gguf(tmp_path / "spm.gguf", spm_fields))
    ours = Tokenizer.from_gguf(spm_fields)
    for text in SPM_TEXTS:
        ids = ours.encode(text)
        assert ids == reference.encode(text), text
        assert ids[0] == 1  # SentencePiece models add BOS by default, as in llama.cpp
        assert ours.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True) == text
    # Characters the vocabulary lacks fall back to their UTF-8 bytes.
    ids = ours.encode("日", add_special_tokens=False)
    pieces = [ours.id_to_token(i) for i in ids]
    assert pieces[-3:] == ["<0xE6>", "<0x97>", "<0xA5>"]
    assert b"".join(ours.token_bytes(i) for i in ids[-3:]) == "日".encode()
    # Other SentencePiece pieces have no byte spelling of their own, even when every character of
    # the piece is also a character of GPT-2's byte alphabet ("é" is not the byte 0xE9 here).
    accented = [i for i in range(ours.vocab_size) if "é" in ours.id_to_token(i)]
    assert accented and all(ours.token_bytes(i) is None for i in accented)


def test_sentencepiece_space_prefix_follows_llama_cpp(spm_fields: dict) -> None:
    ours = Tokenizer.from_gguf(spm_fields)
    hello = ours.encode("hello", add_special_tokens=False)
    assert ours.id_to_token(hello[0]).startswith("\u2581")
    # llama.cpp prefixes a space again after a special token, and keeps a leading space as its own.
    assert ours.encode("</s>hello", add_special_tokens=False) == [2, *hello]
    assert ours.decode(ours.encode(" hello"), skip_special_tokens=True) == " hello"
    no_prefix = Tokenizer.from_gguf({**spm_fields, "tokenizer.ggml.add_space_prefix": False})
    assert not no_prefix.id_to_token(no_prefix.encode("hello", add_special_tokens=False)[0]).startswith("\u2581")


# --- Gemma's SentencePiece vocabulary (no merges in the file) ------------------------------------


@pytest.fixture(scope="module")
def gemma_fields() -> dict:
    return sentencepiece_fields.gemma()


GEMMA_TEXTS = [*SPM_TEXTS, "Hello   world  again", "<start_of_turn>user\nhello<end_of_turn>", "  lead", ""]


def test_gemma_gguf_matches_transformers(gemma_fields: dict, tmp_path: Path) -> None:
    reference = _hf_from_gguf(_write_tokenizer_gguf(tmp_path / "gemma.gguf", gemma_fields))
    ours = Tokenizer.from_gguf(gemma_fields)
    for text in GEMMA_TEXTS:
        assert ours.encode(text) == reference.encode(text), text
    assert ours.id_to_token(ours.encode("a   b", add_special_tokens=False)[1]) == "\u2581" * 3  # respelled


def test_gemma_merges_cache_gives_the_same_ids(gemma_fields: dict, tmp_path: Path) -> None:
    """The merges derived from the vocabulary for the tokenizers backend are kept in a cache file; a
    warm build, and a build over a damaged file (which is derived and written again), give the ids of a
    build without a cache, and those of the encoder."""
    expected = [Tokenizer.from_gguf(gemma_fields).encode(text) for text in GEMMA_TEXTS]
    cache = tmp_path / "merges.bin"
    cold = Tokenizer.from_gguf(gemma_fields, merges_cache=cache).backend
    written = cache.read_bytes()
    assert len(written) > 4 * 2 * 100  # a count, then hundreds of (left, right) id pairs
    warm = Tokenizer.from_gguf(gemma_fields, merges_cache=cache).backend
    for damage in (written[:-4], written[:4] + b"\xff" * (len(written) - 4), b"", b"\x05\x00"):
        cache.write_bytes(damage)  # cut short; ids far past the vocabulary; empty; shorter than its count
        again = Tokenizer.from_gguf(gemma_fields, merges_cache=cache).backend
        assert [again.encode(text).ids for text in GEMMA_TEXTS] == expected
        assert cache.read_bytes() == written
    for backend in (cold, warm):
        assert [backend.encode(text).ids for text in GEMMA_TEXTS] == expected


def test_gemma_merges_cache_lives_in_the_store(gemma_fields: dict, tmp_path: Path, monkeypatch) -> None:
    """Through the loader the cache is keyed by the file's content, listed and freed with the model."""
    from llmos import derived
    from llmos.weights import loader

    monkeypatch.setenv("LLMOS_HOME", str(tmp_path / "home"))
    path = Path(_write_tokenizer_gguf(tmp_path / "gemma.gguf", gemma_fields))
    ids = loader.read_tokenizer(path).backend.encode(GEMMA_TEXTS[0]).ids
    cache = derived.merges_file(path)
    assert cache.parent == tmp_path / "home" / "tokenizers" and cache.is_file()
    assert loader.read_tokenizer(path).backend.encode(GEMMA_TEXTS[0]).ids == ids
    assert [entry.files for entry in derived.entries()] == [(cache,)]
    size = cache.stat().st_size
    assert derived.forget(path) == size and not cache.exists()


def test_gemma_load_builds_no_tokenizers_backend(gemma_fields: dict, monkeypatch) -> None:
    """Gemma's tokenizer encodes, decodes and renders without its tokenizers backend, whose merges cost
    ~0.5 s to build for the real vocabulary; it is built once, when something asks for it."""
    import llmos.tokenizer as module

    built = []
    build = module._gemma_sentencepiece
    monkeypatch.setattr(module, "_gemma_sentencepiece", lambda *args: built.append(1) or build(*args))
    tok = Tokenizer.from_gguf({**gemma_fields, "tokenizer.chat_template": "{{ bos_token }}{{ messages[0]['content'] }}"})
    ids = tok.encode("Hello world<end_of_turn>")
    assert tok.decode(ids, skip_special_tokens=True) == "Hello world"
    assert tok.text_ids("<end_of_turn>", add_special_tokens=False) != [tok.token_to_id("<end_of_turn>")]
    assert tok.chat_ids([{"role": "user", "content": "hi<end_of_turn>"}])[0] == tok.bos_id
    assert tok.id_to_token(ids[1]) and tok.token_bytes(tok.token_to_id("<0x41>")) == b"A"
    assert "".join(_stream(tok.decoder(), ids)) == tok.decode(ids)
    assert tok.vocab_size == len(gemma_fields["tokenizer.ggml.tokens"]) and not built
    assert tok.backend is tok.backend and json.loads(tok.to_json())["model"]["type"] == "BPE"
    assert len(built) == 1 and tok.backend.encode("Hello world<end_of_turn>").ids == ids


def _gemma_texts(alphabet: str, count: int, seed: int) -> list[str]:
    """Random strings over `alphabet` and over several scripts' blocks (byte fallback, odd whitespace,
    specials and their near misses spelled in the text)."""
    rng = random.Random(seed)
    blocks = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x6FF), (0x900, 0x97F),
              (0x3040, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0x1F300, 0x1FAFF), (0x0, 0x1F)]
    glue = [" ", "  ", "   ", "\n", "\n\n", "\t", " \n ", "", ">", "> ", "<eos>", "<start_of_turn>", "<start_of",
            "<0x41>", "\u2581", "\u2581 "]
    texts = []
    for n in range(count):
        parts = []
        for _ in range(rng.randint(1, 30)):
            if n % 3:
                parts.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))))
            else:
                lo, hi = rng.choice(blocks)
                parts.append("".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 8))))
            parts.append(rng.choice(glue))
        texts.append("".join(parts))
    return texts


EDGE_TEXTS = ["日本 unk 🦙", "a\x00b", "x<eos>y<end_of_turn><start_of_turn>", "<start_of_turn", "<<eos>>", "  ",
              "\t\ttabs\n\n\nlines\r\n", "Hello >  world", "\u2581lit\u2581eral", "<0x41>", " ", "a" * 300,
              "<td> </td>", "a > </b>", "日 x", "日本 x", "o t", "go to the"]


def _assert_encoder_matches_backend(tok: Tokenizer, texts: list[str]) -> None:
    backend = tok.backend
    plain = tok._plain_backend
    for text in texts:
        for add in (True, False):
            ids = tok.encode(text, add_special_tokens=add)
            assert ids == backend.encode(text, add_special_tokens=add).ids, text
        assert tok.text_ids(text, add_special_tokens=False) == plain.encode(text, add_special_tokens=False).ids, text
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == backend.decode(ids, skip_special_tokens=skip), text


def test_gemma_encoder_matches_its_backend(gemma_fields: dict) -> None:
    """`SentencePieceBPE` against the tokenizers backend built from the same vocabulary, with and
    without a space prefix and EOS, with a vocabulary that lacks most byte pieces (unknown characters
    fused into one unknown piece), and with pieces that merge across a space ("o▁t", and "<0xA5>▁"
    after the last byte of "日") and a user-defined token inside a control token ("_turn>": matching
    goes on after a control token's spelling that `text_ids` leaves in the text)."""
    tokens = gemma_fields["tokenizer.ggml.tokens"]
    alphabet = "".join(sorted({c for t in tokens[262:] for c in t.replace("\u2581", " ")}))
    texts = [*GEMMA_TEXTS, *SPM_TEXTS, *TEXTS, *SPM_CORPUS[:4], *EDGE_TEXTS, *_gemma_texts(alphabet, 150, seed=0)]
    keep = [i for i, t in enumerate(tokens) if not ("<0x80>" <= t <= "<0xFF>" and len(t) == 6)]
    few_bytes = {**gemma_fields, "tokenizer.ggml.tokens": [tokens[i] for i in keep],
                 "tokenizer.ggml.token_type": [gemma_fields["tokenizer.ggml.token_type"][i] for i in keep]}
    across = {**gemma_fields, "tokenizer.ggml.tokens": [*tokens, "o\u2581t", "<0xA5>\u2581", "_turn>"],
              "tokenizer.ggml.token_type": [*gemma_fields["tokenizer.ggml.token_type"], 1, 1, 4]}
    prefix_eos = {**gemma_fields, "tokenizer.ggml.add_space_prefix": True, "tokenizer.ggml.add_eos_token": True}
    assert Tokenizer.from_gguf(across).encode("o t", add_special_tokens=False) == [len(tokens)]
    for fields in (gemma_fields, prefix_eos, few_bytes, across):
        tok = Tokenizer.from_gguf(fields)
        _assert_encoder_matches_backend(tok, texts)
        assert all(tok.id_to_token(i) == tok.backend.id_to_token(i) for i in range(tok.vocab_size))
        assert tok.vocab_size == tok.backend.get_vocab_size(with_added_tokens=True)
        rng = random.Random(1)
        for _ in range(100):  # random ids: byte pieces that are not UTF-8, specials, runs of "▁"
            ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 20))]
            for skip in (True, False):
                assert tok.decode(ids, skip_special_tokens=skip) == tok.backend.decode(ids, skip_special_tokens=skip)
    assert Tokenizer.from_gguf(few_bytes).encode("日本", add_special_tokens=False) == [3]  # one fused <unk>


def test_gemma_encoder_matches_its_backend_on_random_vocabularies() -> None:
    """Vocabularies of random strings over "a", "b" and "▁" in random order, so that pairs of equal rank
    and merges across a space meet often: the merge order is tokenizers'."""
    rng = random.Random(4)
    strings = ["".join(p) for n in range(2, 6) for p in itertools.product("ab\u2581", repeat=n)]
    for _ in range(30):
        pieces = ["a", "b", "\u2581", *rng.sample(strings, rng.randint(5, 60))]
        rng.shuffle(pieces)
        specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
        fields = {**sentencepiece_fields.gemma(), "tokenizer.ggml.tokens": [*specials, *pieces],
                  "tokenizer.ggml.token_type": [3, 3, 3, 2, *[1] * len(pieces)]}
        texts = ["".join(rng.choice("ab ") for _ in range(rng.randint(1, 40))) for _ in range(40)]
        _assert_encoder_matches_backend(Tokenizer.from_gguf(fields), texts)


def test_gemma_encoder_matches_its_backend_on_the_real_file(gemma3_path: str) -> None:
    """The real Gemma 3 vocabulary (262,144 pieces): the encoder gives the backend's ids on text in many
    scripts, code, long documents and random strings, and decoding gives the text back."""
    import llmos.tokenizer
    from llmos.weights import loader

    tok = loader.read_tokenizer(gemma3_path)
    rng = random.Random(2)
    pieces = [tok.id_to_token(rng.randrange(262, tok.vocab_size)) for _ in range(20000)]
    words = ["".join(pieces[i : i + 40]).replace("\u2581", " ") for i in range(0, len(pieces), 40)]
    source = Path(llmos.tokenizer.__file__).read_text(encoding="utf-8")
    long = [source, " ".join(TEXTS) * 20, "".join(words[:100])]
    alphabet = "".join(sorted({c for p in pieces for c in p.replace("\u2581", " ")}))
    texts = [*TEXTS, *GEMMA_TEXTS, *EDGE_TEXTS, *words, *long, *_gemma_texts(alphabet, 200, seed=3)]
    _assert_encoder_matches_backend(tok, texts)
    for text in texts:  # a "▁" or "<0x41>" in the text decodes as " " or "A"
        if "\u2581" not in text and "<0x" not in text:
            assert tok.decode(tok.encode(text), skip_special_tokens=False) == "<bos>" + text


# --- Hugging Face folders ------------------------------------------------------------------------


@pytest.mark.slow
def test_from_dir_matches_transformers(hf, tmp_path: Path) -> None:
    hf.save_pretrained(tmp_path)
    ours = Tokenizer.from_dir(tmp_path)
    for text in TEXTS:
        assert ours.encode(text) == hf.encode(text), text
        assert ours.decode(ours.encode(text)) == text
    assert (ours.bos_id, ours.eos_id, ours.vocab_size) == (1, 2, 49152)
    assert {2} <= ours.stop_ids and ours.special_ids == frozenset(range(17))
    for messages in CONVERSATIONS:
        assert ours.apply_chat_template(messages) == hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )


def _tiny_bpe_folder(folder: Path, config: dict, generation: dict | None = None, post_processor: bool = False) -> Path:
    """A GPT-2-style byte-level BPE trained on a few lines, saved as a Hugging Face folder."""
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|user|>", "<|end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(SPM_CORPUS, trainer)
    if post_processor:
        from tokenizers import processors

        backend.post_processor = processors.TemplateProcessing(
            single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", backend.token_to_id("<|endoftext|>"))]
        )
    # As sentence-transformers folders do; from_dir must encode one text without either.
    backend.enable_padding(length=64)
    backend.enable_truncation(max_length=8)
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if generation is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation))
    return folder


def test_from_dir_tiny_trained_bpe(tmp_path: Path) -> None:
    template = (
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    folder = _tiny_bpe_folder(
        tmp_path / "tiny",
        {"eos_token": {"content": "<|endoftext|>", "special": True}, "chat_template": template},
        generation={"eos_token_id": [0, 2]},
    )
    ours = Tokenizer.from_dir(folder)
    reference = Backend.from_file(str(folder / "tokenizer.json"))
    assert len(reference.encode("hi").ids) == 64  # the file pads, ...
    reference.no_padding()
    reference.no_truncation()
    assert len(ours.encode(TEXTS[0])) > 8 and len(ours.encode("hi")) < 8  # ... ours neither pads nor truncates
    for text in TEXTS:
        assert ours.encode(text) == reference.encode(text).ids
        assert ours.decode(ours.encode(text)) == text
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (None, 0, None)
    assert ours.stop_ids == {0, 2}  # generation_config's ids; <|end|> is also a known end-of-turn token
    assert ours.special_ids == {0, 1, 2}
    assert ours.encode("hi<|end|>")[-1] == 2
    assert ours.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|user|>hi<|end|><|assistant|>"


def test_from_dir_bos_from_config_or_post_processor(tmp_path: Path) -> None:
    config = {"bos_token": "<|endoftext|>", "add_bos_token": True}
    plain = Tokenizer.from_dir(_tiny_bpe_folder(tmp_path / "a", config))
    assert plain.encode("hello")[0] == 0 and plain.encode("hello", add_special_tokens=False)[0] != 0
    # A post-processor in tokenizer.json wins over the config, as in transformers.
    config = {"bos_token": "<|endoftext|>", "add_bos_token": False}
    templated = Tokenizer.from_dir(_tiny_bpe_folder(tmp_path / "b", config, post_processor=True))
    assert templated.encode("hello")[0] == 0


def test_from_dir_errors(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot read"):
        Tokenizer.from_dir(tmp_path)


# --- chat templates ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_template_matches_transformers(tok: Tokenizer, hf, messages: list) -> None:
    for add_generation_prompt in (True, False):
        expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


def test_chat_template_default_system_prompt(tok: Tokenizer) -> None:
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def _with_template(metadata: dict, template: str | None) -> Tokenizer:
    fields = {k: v for k, v in metadata.items() if k != "tokenizer.chat_template"}
    return Tokenizer.from_gguf(fields if template is None else {**fields, "tokenizer.chat_template": template})


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__.__init__.__globals__ }}",
        "{{ raise_exception.__globals__ }}",
        "{% set ns = namespace() %}{% set ns.__dict__ = 1 %}",
        "{{ messages.append({'role': 'x'}) }}",
    ],
)
def test_chat_template_sandbox(metadata: dict, template: str) -> None:
    with pytest.raises(TokenizerError, match="unsafe|cannot set"):
        _with_template(metadata, template).apply_chat_template([{"role": "user", "content": "hi"}])


def test_chat_template_helpers(metadata: dict) -> None:
    messages = [{"role": "user", "content": "<b>&'\"中"}]
    tojson = _with_template(metadata, "{{ messages[0].content | tojson }}|{{ messages | tojson(indent=1) }}")
    assert tojson.apply_chat_template(messages) == json.dumps("<b>&'\"中", ensure_ascii=False) + "|" + json.dumps(
        messages, ensure_ascii=False, indent=1
    )
    tokens = _with_template(metadata, "{{ bos_token }}-{{ eos_token }}-{{ flavour }}")
    assert tokens.apply_chat_template(messages, flavour="lime") == "<|im_start|>-<|im_end|>-lime"
    refusing = _with_template(
        metadata, "{% if messages[0].role != 'system' %}{{ raise_exception('system first') }}{% endif %}"
    )
    with pytest.raises(TokenizerError, match="system first"):
        refusing.apply_chat_template(messages)
    # trim_blocks/lstrip_blocks drop the newlines and indentation around block tags, as in transformers.
    blocks = _with_template(
        metadata, "{% for m in messages %}\n  {% generation %}{{ m.content }}{% endgeneration %}\n{% endfor %}"
    )
    assert blocks.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]) == "ab"
    with pytest.raises(TokenizerError, match="not valid Jinja"):
        _with_template(metadata, "{% for %}").apply_chat_template(messages)


def test_chat_template_missing_or_bad_messages(metadata: dict, tok: Tokenizer) -> None:
    with pytest.raises(TokenizerError, match="no chat template"):
        _with_template(metadata, None).apply_chat_template([{"role": "user", "content": "hi"}])
    bad = [
        ("hello", "must be a list"),
        ([["user", "hi"]], r"messages\[0\] must be a dict"),
        ([{"content": "hi"}], r"messages\[0\] needs a 'role'"),
        ([{"role": "user", "content": "ok"}, {"role": "user", "content": 3}], r"messages\[1\] needs a 'content'"),
    ]
    for messages, error in bad:
        with pytest.raises(TokenizerError, match=error):
            tok.apply_chat_template(messages)


# --- incremental decoding ------------------------------------------------------------------------


def _stream(decoder: IncrementalDecoder, ids: list[int]) -> list[str]:
    return [decoder.push(i) for i in ids] + [decoder.flush()]


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_decoder_equals_decode(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    pieces = _stream(tok.decoder(), ids)
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in piece for piece in pieces)
    skipping = _stream(tok.decoder(skip_special_tokens=True), ids)
    assert "".join(skipping) == tok.decode(ids, skip_special_tokens=True)


def test_incremental_decoder_holds_back_split_characters(tok: Tokenizer) -> None:
    text = "模型说：🦙👨‍👩‍👧 好的"
    ids = tok.encode(text)
    decoder = tok.decoder()
    pieces = [decoder.push(i) for i in ids]
    assert "".join(pieces) + decoder.flush() == text
    assert not any("\ufffd" in p for p in pieces)
    # Some ids carry only part of a character: their push returns "" and the text comes later.
    assert len(ids) > len(text) and "" in pieces


def test_incremental_decoder_on_random_ids(tok: Tokenizer) -> None:
    # Random byte pieces include invalid UTF-8; the stream must still add up to decode().
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))]
        assert "".join(_stream(tok.decoder(), ids)) == tok.decode(ids)


def test_incremental_decoder_decodes_a_short_window(tok: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    lengths: list[int] = []
    decode = tok.decode

    def counting(ids, skip_special_tokens=False):
        lengths.append(len(ids))
        return decode(ids, skip_special_tokens)

    monkeypatch.setattr(tok, "decode", counting)
    ids = tok.encode("The quick brown fox jumps over the lazy dog. 你好世界。" * 50)
    assert "".join(_stream(tok.decoder(), ids)) == decode(ids)
    assert max(lengths) <= 8  # never re-decodes the whole sequence
