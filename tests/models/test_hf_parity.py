"""Parity with transformers on tiny random configs, through the production loader.

Each family is saved with `save_pretrained` (safetensors) and loaded by llmos from the folder; logits
must agree within 1e-4 in fp32 and greedy decoding must produce the same 32 tokens.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from hf_reference import cached_vs_full, hf_greedy, llmos_greedy, reference, saved_and_loaded

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
            num_attention_heads=4, max_position_embeddings=128)

CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**TINY, num_key_value_heads=2, rope_theta=5000.0, tie_word_embeddings=False),
    "llama-tied-mha": lambda: transformers.LlamaConfig(**TINY, num_key_value_heads=4, tie_word_embeddings=True),
    "llama3-rope": lambda: transformers.LlamaConfig(**TINY, num_key_value_heads=2, rope_theta=500000.0,
                                                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "mistral": lambda: transformers.MistralConfig(**TINY, num_key_value_heads=1, sliding_window=16),
    "qwen2": lambda: transformers.Qwen2Config(**TINY, num_key_value_heads=2, tie_word_embeddings=True),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=256, n_embd=64, n_layer=3, n_head=4, n_positions=128),
}


def _reference(kind: str):
    # Random init leaves biases at zero; give them values so a dropped bias cannot pass unnoticed.
    return reference(CONFIGS[kind](), noisy=("bias", "norm", "ln"))


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    ref = _reference(request.param)
    return request.param, ref, *saved_and_loaded(ref, tmp_path_factory.mktemp(request.param))


def test_logits_match(pair):
    kind, ref, model, _ = pair
    torch.manual_seed(1)
    tokens = torch.randint(0, 256, (2, 40))  # 40 > sliding window 16 for Mistral
    with torch.no_grad():
        expected = ref(tokens).logits
        got = model(tokens, torch.arange(40))
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-4, kind


def test_greedy_32_tokens_match(pair):
    kind, ref, model, _ = pair
    prompt = [5, 17, 99, 3, 250, 42]
    assert llmos_greedy(model, prompt, 32) == hf_greedy(ref, prompt, 32), kind


def test_cached_decode_equals_uncached(pair):
    kind, _, model, config = pair
    assert cached_vs_full(model, config, 24) < 1e-5, kind


def test_gpt2_by_name_after_adding_to_the_store(tmp_path, monkeypatch):
    """`from_pretrained("gpt2")` says how to provide a checkpoint, then works once one is added."""
    from llmos import AutoModelForCausalLM, store
    from llmos.errors import LlmosError

    monkeypatch.setenv("LLMOS_HOME", str(tmp_path / "home"))
    with pytest.raises(LlmosError, match="gguf file or a Hugging Face folder"):
        AutoModelForCausalLM.from_pretrained("gpt2")
    folder = tmp_path / "gpt2"
    ref = _reference("gpt2")
    ref.save_pretrained(folder)
    _tiny_tokenizer().save(str(folder / "tokenizer.json"))
    store.add(folder, "gpt2", quiet=True)
    model = AutoModelForCausalLM.from_pretrained("gpt2", dtype=torch.float32)
    tokens = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert (model(tokens).logits - ref(tokens).logits).abs().max() < 1e-4
    assert model.generate(tokens, max_new_tokens=4).shape == (1, 9)


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders

    vocab = {chr(ord("a") + i): i for i in range(26)}
    vocab.update({f"t{i}": i for i in range(26, 256)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok
