"""transformers-style `model.generate(...)` against transformers itself on a tiny random Llama with
the default model's tokenizer: greedy, beam search (`num_beams`, `length_penalty`, `early_stopping`,
`num_return_sequences`) and a `streamer=` give the same ids and the same streamer calls."""

from __future__ import annotations

import pytest
import torch
import transformers

from llmos import AutoModelForCausalLM, AutoTokenizer, TextStreamer

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def pair(tmp_path_factory, default_model_name):
    """(transformers model, llmos model, llmos tokenizer, stop id) over the same weights."""
    from llmos.api import load_tokenizer

    tok = load_tokenizer(default_model_name)
    folder = tmp_path_factory.mktemp("tiny-auto-llama")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=128, tie_word_embeddings=True, initializer_range=0.2,
        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    ref = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        ref.model.norm.weight.mul_(6.0)  # peaked next-token distributions, as a trained model's: no near ties
    ref.save_pretrained(folder)
    tok.backend.save(str(folder / "tokenizer.json"))
    ours = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer.encode(PROMPT, return_tensors="pt")
    with torch.no_grad():
        greedy = ref.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=7)
    return ref, ours, tokenizer, int(greedy[0, ids.shape[1] + 2])  # a stop id some beams reach


@pytest.mark.parametrize("num_beams, nrs, length_penalty, early_stopping", [
    (4, 4, 1.0, False), (3, 2, 0.5, True), (4, 1, 2.0, "never"), (2, 2, -1.0, False),
])
def test_beam_search_matches_transformers(pair, num_beams, nrs, length_penalty, early_stopping):
    ref, ours, tokenizer, stop = pair
    ids = tokenizer.encode(PROMPT, return_tensors="pt")
    # pad 7, not 0: transformers pads beams with EOS when pad_token_id is 0 (`pad_token_id or eos`)
    kw = dict(max_new_tokens=10, num_beams=num_beams, num_return_sequences=nrs, length_penalty=length_penalty,
              early_stopping=early_stopping, eos_token_id=stop, pad_token_id=7)
    with torch.no_grad():
        expected = ref.generate(ids, do_sample=False, **kw)
    got = ours.generate(ids, **kw)
    assert got.tolist() == expected.tolist()


def test_more_sequences_than_beams_is_refused(pair):
    _, ours, tokenizer, _ = pair
    with pytest.raises(ValueError, match="num_return_sequences"):
        ours.generate(tokenizer.encode(PROMPT, return_tensors="pt"), max_new_tokens=4, num_beams=2, num_return_sequences=3)


class Recorder:
    def __init__(self):
        self.calls = []

    def put(self, value):
        self.calls.append(("put", value.tolist()))

    def end(self):
        self.calls.append(("end",))


def test_streamer_gets_transformers_calls_and_text_streamer_prints_the_new_text(pair, capsys):
    ref, ours, tokenizer, stop = pair
    ids = tokenizer.encode(PROMPT, return_tensors="pt")
    expected, got = Recorder(), Recorder()
    with torch.no_grad():
        out_ref = ref.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=stop, pad_token_id=7, streamer=expected)
    out = ours.generate(ids, max_new_tokens=8, eos_token_id=stop, pad_token_id=7, streamer=got)
    assert torch.equal(out, out_ref) and got.calls == expected.calls
    ours.generate(ids, max_new_tokens=8, eos_token_id=stop, pad_token_id=7, streamer=TextStreamer(tokenizer, skip_prompt=True))
    assert capsys.readouterr().out == tokenizer.decode(out[0, ids.shape[1]:]) + "\n"
