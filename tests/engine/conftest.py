"""Tiny random reference models for the engine tests, loaded through llmos' production loader.

Each family is built with transformers (fp32, eager attention), saved with `save_pretrained` and
loaded by `load_hf`, so a test can run the same weights through both. The final norm is scaled up
so next-token distributions are peaked, as a trained model's are: near-uniform random logits would
almost never end a beam on a stop id, and ties would be too close to call.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from llmos.weights.load import load_hf, read_hf_config

VOCAB = 128

CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
        bos_token_id=None, eos_token_id=None),
}


def build(kind: str, seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    ref = transformers.AutoModelForCausalLM.from_config(CONFIGS[kind](), attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln" in name:
                p.add_(torch.randn_like(p) * 0.1)
        final = ref.model.norm if kind == "llama" else ref.transformer.ln_f
        final.weight.mul_(6.0)
    # No special ids from the config: each test says which stop id it wants.
    ref.generation_config.bos_token_id = ref.generation_config.eos_token_id = None
    ref.generation_config.pad_token_id = None
    return ref


@pytest.fixture(scope="session", params=sorted(CONFIGS))
def tiny_pair(request, tmp_path_factory):
    """(kind, transformers model, llmos model) with the same weights."""
    ref = build(request.param)
    folder = tmp_path_factory.mktemp(f"tiny-{request.param}")
    ref.save_pretrained(folder)
    return request.param, ref, load_hf(folder, read_hf_config(folder))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    ref = build("llama")
    folder = tmp_path_factory.mktemp("tiny-llama-only")
    ref.save_pretrained(folder)
    return ref, load_hf(folder, read_hf_config(folder))


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and the test machine is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
