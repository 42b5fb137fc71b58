"""Export: Hugging Face folders transformers loads with the same logits; GGUF files llmos loads back."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers

import llmos
from llmos.config import ModelConfig
from llmos.errors import LlmosError
from llmos.models.lora import LoraConfig, apply_lora
from llmos.train.bpe import load_tokenizer
from llmos.train.presets import init_weights, model_config
from llmos.weights.export import hf_config, permute_gguf_qk, save_gguf, save_hf
from llmos.weights.load import build_model, unpermute_gguf_qk

TEXT = "The old man watches the river in the park. In the Zorblax plant, pump P-117 is rated for 30 bar."


def _config(kind: str, tiny: dict) -> ModelConfig:
    if kind == "llama":  # grouped-query attention, tied head
        return model_config("tiny", "llama", 512, **tiny)
    if kind == "gpt2":
        return model_config("tiny", "gpt2", 512, **tiny)
    # Qwen2 shape: q/k/v biases, separate head, 4 kv heads of 4
    base = model_config("tiny", "llama", 512, **tiny)
    return dataclasses.replace(base, qkv_bias=True, tie_embeddings=False, n_kv_heads=4, rope_theta=5000.0)


def _model(config: ModelConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(config, "cpu")
    init_weights(model, config.n_layers, std=0.1)  # larger than training init: logits of a real spread
    with torch.no_grad():  # non-trivial norms and biases, so a dropped or misplaced one shows
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.tie_weights()
    return model.eval()


@pytest.fixture(scope="module")
def tok(tokenizer_file):
    return load_tokenizer(tokenizer_file)


def _logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]), torch.arange(len(ids)))[0]


@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen2-untied"])
def test_hf_export_matches_transformers(kind, tmp_path, tok, tiny):
    config = _config(kind, tiny)
    model = _model(config)
    folder = save_hf(model, config, tok, tmp_path / kind)
    ids = tok.encode(TEXT)
    expected = _logits(model, ids)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        got = ref(torch.tensor([ids])).logits[0]
    assert (got - expected).abs().max().item() < 1e-4, kind
    # Same greedy continuation, and llmos reads its own export back exactly.
    with torch.no_grad():
        hf_gen = ref.generate(torch.tensor([ids[:8]]), max_new_tokens=12, do_sample=False, min_new_tokens=12,
                              eos_token_id=None, pad_token_id=0)[0, 8:].tolist()
    llm = llmos.load(str(folder), dtype="fp32")
    assert llm.generate(tok.decode(ids[:8]), max_new_tokens=12, temperature=0).token_ids == hf_gen
    assert (llm.logits(ids) - expected).abs().max().item() < 1e-5
    assert llm.config == config.__class__(**{**dataclasses.asdict(config), "name": llm.config.name})
    # The tokenizer and chat template travel too. (transformers forces its own Qwen2Tokenizer
    # pre-tokenizer on model_type qwen2, so a custom tokenizer is checked with the generic class.)
    auto = transformers.PreTrainedTokenizerFast if kind.startswith("qwen2") else transformers.AutoTokenizer
    hf_tok = auto.from_pretrained(folder)
    assert hf_tok(TEXT)["input_ids"] == ids
    chat = [{"role": "user", "content": "hi"}]
    assert hf_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == tok.apply_chat_template(chat)


def test_hf_export_of_a_lora_model_is_merged(tmp_path, tok, tiny):
    config = _config("llama", tiny)
    model = _model(config)
    apply_lora(model, LoraConfig(rank=2))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_b"):
                p.normal_(0, 0.5)
    ids = tok.encode(TEXT)
    expected = _logits(model, ids)
    llm = llmos.load(str(save_hf(model, config, tok, tmp_path / "m")), dtype="fp32")
    assert (llm.logits(ids) - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen2-untied"])
@pytest.mark.parametrize("qtype,tol", [("f16", 2e-3), ("q8_0", 3e-2)])
def test_gguf_export_loads_back_within_quantization_error(kind, qtype, tol, tmp_path, tok, tiny):
    config = _config(kind, tiny)
    model = _model(config)
    path = save_gguf(model, config, tok, tmp_path / f"{kind}-{qtype}.gguf", qtype)
    llm = llmos.load(str(path), dtype="fp32")
    ids = tok.encode(TEXT)
    expected = _logits(model, ids)
    diff = (llm.logits(ids) - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert 0 < diff < tol * scale, (kind, qtype, diff, scale)
    assert llm.config.arch == config.arch and llm.config.n_kv_heads == config.n_kv_heads
    assert llm.config.tie_embeddings == config.tie_embeddings and llm.config.qkv_bias == config.qkv_bias
    # The tokenizer inside encodes alike and keeps the chat template and stop tokens.
    assert llm.tokenizer.encode(TEXT + "<|im_end|>") == tok.encode(TEXT + "<|im_end|>")
    assert llm.tokenizer.chat_template == tok.chat_template and llm.tokenizer.stop_ids == tok.stop_ids


def test_q8_0_is_smaller_than_f16(tmp_path, tok, tiny):
    config = _config("llama", tiny)
    model = _model(config)
    f16 = save_gguf(model, config, tok, tmp_path / "a.gguf", "f16").stat().st_size
    q8 = save_gguf(model, config, tok, tmp_path / "b.gguf", "q8_0").stat().st_size
    assert q8 < 0.75 * f16
    with pytest.raises(LlmosError, match="f16, q8_0"):
        save_gguf(model, config, tok, tmp_path / "c.gguf", "q4_k")


def test_gguf_qk_permutation_is_the_inverse_of_the_loader():
    w = torch.randn(4 * 16, 24)
    assert torch.equal(unpermute_gguf_qk(permute_gguf_qk(w, 4), 4), w)
    assert not torch.equal(permute_gguf_qk(w, 4), w)


def test_hf_config_round_trips(tiny):
    for kind in ("llama", "gpt2", "qwen2-untied"):
        config = _config(kind, tiny)
        back = ModelConfig.from_hf_json(hf_config(config))
        assert dataclasses.replace(back, name=config.name) == config


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_gguf_export_loads_in_transformers(kind, tmp_path, tok, tiny):
    """An outside reader agrees: transformers' GGUF loader gives the logits llmos gives on the same
    F16 file (this also checks llmos's GGUF GPT-2 and Llama loading against a reference)."""
    config = _config(kind, tiny)
    if kind == "gpt2":  # transformers' GGUF reader ignores gpt2.context_length and assumes 1024
        config = dataclasses.replace(config, max_seq_len=1024)
    path = save_gguf(_model(config), config, tok, tmp_path / f"{kind}.gguf", "f16")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    ids = tok.encode(TEXT)
    ours = llmos.load(str(path), dtype="fp32").logits(ids)
    with torch.no_grad():
        theirs = ref(torch.tensor([ids])).logits[0]
    assert (ours - theirs).abs().max().item() < 1e-4
