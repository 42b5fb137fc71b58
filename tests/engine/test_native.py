"""The native (C++) decode step gives exactly the Python step's results: the same logits and cache
bits in every weight form, for shared and per-row positions; models it does not cover fall back to
the Python step; a machine without a compiler still generates."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llmos import quant
from llmos.config import ModelConfig
from llmos.engine import native
from llmos.models.gpt2 import GPT2
from llmos.models.kv_cache import KVCache
from llmos.models.llama import Llama
from llmos.models.lora import LoraConfig, apply_lora
from llmos.weights.load import _set_module


def _tiny(form: str = "fp32", **overrides) -> Llama:
    torch.manual_seed(0)
    config = ModelConfig(arch="llama", vocab_size=128, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=96,
                         max_seq_len=64, **overrides)
    model = Llama(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    hook = quant.linear_hook(form)
    if hook is not None:
        for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]:
            _set_module(model, name, hook(name, layer.weight.detach(), None if layer.bias is None else layer.bias.detach(), None))
    return model


def _python_step(model, tokens, positions, cache):
    with torch.inference_mode():
        return model.output(model.hidden(tokens[:, None], positions, cache)[:, -1]).float()


@pytest.fixture(scope="module")
def built():
    module = native.build(quiet=True)
    assert module is not None, native.failure()  # CI installs g++: the native step must build there
    return module


@pytest.mark.parametrize("form", ["fp32", "bf16", "int8", "int4"])
@pytest.mark.parametrize("qkv_bias", [False, True])
def test_native_step_equals_python_step(built, form, qkv_bias):
    model = _tiny(form, qkv_bias=qkv_bias)
    step = native.stepper(model)
    assert step is not None
    torch.manual_seed(1)
    for rows, per_row in ((1, False), (3, False), (4, True)):
        fast, slow = KVCache.for_model(model.config, rows, 40), KVCache.for_model(model.config, rows, 40)
        prompt = torch.randint(0, 128, (rows, 8))
        with torch.inference_mode():
            model.hidden(prompt, torch.arange(8), fast)
            model.hidden(prompt, torch.arange(8), slow)
        start = torch.tensor([[8], [10], [12], [9]])[:rows] if per_row else torch.tensor([8])
        for i in range(6):
            tokens = torch.randint(0, 128, (rows,))
            positions = start + i
            with torch.inference_mode():
                got = step(tokens, positions, fast)
            want = _python_step(model, tokens, positions, slow)
            assert torch.equal(got, want), (form, rows, per_row, i)
        assert torch.equal(fast.k, slow.k) and torch.equal(fast.v, slow.v)
        assert fast.length == slow.length


def test_default_model_generates_the_same_text_natively(built, fast_llm, monkeypatch):
    prompt = "The three primary colours are"
    native_text = fast_llm.generate(prompt, max_new_tokens=24, temperature=0)
    monkeypatch.setenv("LLMOS_NATIVE", "0")
    python_text = fast_llm.generate(prompt, max_new_tokens=24, temperature=0)
    assert native_text == python_text and len(native_text.strip()) > 0


def test_models_outside_the_native_step_use_the_python_step(built):
    gpt2 = GPT2(ModelConfig(arch="gpt2", vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=64,
                            max_seq_len=32, act="gelu_new"))
    assert native.stepper(gpt2) is None
    assert native.stepper(_tiny(sliding_window=4)) is None


def test_lora_adapters_added_later_are_not_skipped(built):
    model = _tiny()
    cache = KVCache.for_model(model.config, 1, 16)
    tokens = torch.tensor([5])
    before = native.decode(model, tokens, torch.tensor([0]), cache)
    apply_lora(model, LoraConfig(rank=2))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.normal_()  # a non-zero adapter changes the output
    expected = _python_step(model, tokens, torch.tensor([0]), KVCache.for_model(model.config, 1, 16))
    after = native.decode(model, tokens, torch.tensor([0]), KVCache.for_model(model.config, 1, 16))
    assert torch.equal(after, expected) and not torch.equal(after, before)


def test_without_a_compiler_generation_still_works(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMOS_HOME", str(tmp_path))  # nothing built here
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(native, "_module", None)
    monkeypatch.setattr(native, "_failed", None)
    monkeypatch.setattr(native, "_steppers", __import__("weakref").WeakKeyDictionary())
    assert native.build(quiet=True) is None
    assert "C++ compiler" in native.failure()
    model = _tiny()
    cache = KVCache.for_model(model.config, 1, 16)
    got = native.decode(model, torch.tensor([7]), torch.tensor([0]), cache)
    assert torch.equal(got, _python_step(model, torch.tensor([7]), torch.tensor([0]), KVCache.for_model(model.config, 1, 16)))


def test_a_store_it_cannot_write_to_leaves_the_python_step(tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("LLMOS_HOME", str(blocked))  # the build folder cannot be created under a file
    monkeypatch.setattr(native, "_module", None)
    monkeypatch.setattr(native, "_failed", None)
    assert native.build(quiet=True) is None
    assert "failed" in native.failure()


def test_the_extension_builds_from_source_into_an_empty_store(tmp_path):
    """What a fresh machine does once (make run / the first llmos.load): compile, then import."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "LLMOS_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "llmos.engine.native"], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "failed" not in out.stderr, out.stderr
    assert list(tmp_path.glob("native/*/llmos_native_step.so"))
