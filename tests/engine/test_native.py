"""The native (C++) kernels, installed on a model at load time, and their decode step, which gives the Python step's results (its own attention kernel differs from
SDPA by ~3e-7; everything else is the same arithmetic) in every weight form, for shared and per-row
positions, independently of the thread count, for the Llama family (with Qwen3's q/k norms and
Mistral's window) and Gemma 3 (its norms, GeGLU, query scale, sliding and full layers with their own
RoPE bases, prompts longer than the window); models it does not cover fall back to the Python step; a
machine without a compiler still generates."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llmos import quant
from llmos.config import ModelConfig
from llmos.engine import native
from llmos.engine.generate import Generation, decode
from llmos.engine.sampling import SamplingParams
from llmos.models import attention, set_module
from llmos.models.gemma2 import Gemma2
from llmos.models.gemma3 import Gemma3
from llmos.models.gpt2 import GPT2
from llmos.models.kernels import PYTORCH, install
from llmos.models.kv_cache import KVCache
from llmos.models.llama import Llama
from llmos.models.lora import LoraConfig, apply_lora


GEMMA3 = {"arch": "gemma3", "n_layers": 4, "n_kv_heads": 1, "head_dim": 32, "norm_eps": 1e-6, "tie_embeddings": True,
          "sliding_window": 6, "rope_theta": 1e6, "rope_local_theta": 1e4, "query_pre_attn_scalar": 24,
          "layer_types": ("sliding_attention", "sliding_attention", "full_attention", "sliding_attention")}


def _tiny(form: str = "fp32", **overrides) -> Llama | Gemma2 | Gemma3:
    """A random Llama (or, with GEMMA2's or GEMMA3's overrides, a Gemma) in `form`, built as the loader builds it."""
    torch.manual_seed(0)
    config = ModelConfig(**{"arch": "llama", "vocab_size": 128, "dim": 64, "n_layers": 3, "n_heads": 4, "n_kv_heads": 2,
                            "ffn_dim": 96, "max_seq_len": 64, **overrides})
    model = {"gemma2": Gemma2, "gemma3": Gemma3}.get(config.arch, Llama)(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    model.tie_weights()
    hook = quant.linear_hook(form)
    if hook is not None:
        for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]:
            new = hook(name, layer.weight.detach(), None if layer.bias is None else layer.bias.detach(), None)
            if config.tie_embeddings and name == "output" and hasattr(new, "tied") and hasattr(model, "embed_from_head"):
                new = new.tied()  # as the loader does: one int8 table serves the head and the embeddings
                model.embed_from_head(new)
            set_module(model, name, new)
    return install(model, native.kernels(quiet=True))  # as a loader does: the Python step runs the native kernels too


def _python_step(model, tokens, positions, cache):
    with torch.inference_mode():
        return model.logits(model.hidden(tokens[:, None], positions, cache)[:, -1]).float()


@pytest.fixture(scope="module")
def built():
    module = native.build(quiet=True)
    assert module is not None, native.failure()  # CI installs g++: the native step must build there
    return module


def _bound(form: str, kv: torch.dtype, want: torch.Tensor) -> float:
    """How far the C++ step's logits may be from the Python step's `want`. In fp32 with an fp32 cache
    1e-5, as the issue asks. With an fp16 cache, whose values can round one fp16 step apart between the
    paths, an fp16 step of the largest logit (measured: both paths ~2.5e-4 from a float64 model there,
    ~2e-5 apart). The other forms round activations (and their logits) to bf16, where a last-bit
    difference from attention can move a value by a bf16 step or two: two bf16 steps of the largest
    logit (measured up to 0.96 of one; Gemma 2's logits run up to its cap)."""
    top = want.abs().max().item()
    if form == "fp32":
        return 1e-5 if kv == torch.float32 else max(1e-5, 2 ** -11 * top)
    return max(1e-5, 2 ** -7 * top)


# Model variants the step covers: Llama, Qwen2's biases, Qwen3's q/k norms, Mistral's window (shorter than
# the prompt), Gemma 3 (a window shorter than the prompt on three layers of four), Gemma 3 with 256-wide
# heads, Gemma 2 (caps low enough to bend the scores and logits; tanh and erf GELU).
GEMMA2 = {"arch": "gemma2", "n_layers": 4, "n_kv_heads": 2, "head_dim": 32, "norm_eps": 1e-6, "tie_embeddings": True,
          "sliding_window": 6, "query_pre_attn_scalar": 24, "attn_softcap": 5.0, "final_softcap": 3.0, "act": "gelu_new",
          "layer_types": ("sliding_attention", "full_attention") * 2}
VARIANTS = {"llama": {}, "qkv_bias": {"qkv_bias": True}, "qk_norm": {"qk_norm": True}, "window": {"sliding_window": 5},
            "gemma3": GEMMA3, "gemma3-256": {**GEMMA3, "head_dim": 256, "query_pre_attn_scalar": 256},
            "gemma2": GEMMA2, "gemma2-erf-gelu": {**GEMMA2, "act": "gelu"}}


@pytest.mark.parametrize("form, kv", [("fp32", torch.float32), ("bf16", torch.float32), ("int8", torch.float16),
                                      ("int4", torch.float32), ("int4", torch.float16), ("fp32", torch.float16)])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_native_step_equals_python_step(built, form, kv, variant):
    """Also with an fp16 KV cache (the quantized forms' default): both paths round keys and values
    to fp16 once when writing them and attend over the same values. Prompts of 8 and decoding to
    position 19 cross the windows (5, 6): keys leave them at every step."""
    model = _tiny(form, **VARIANTS[variant])
    step = native.stepper(model)
    assert step is not None
    torch.manual_seed(1)
    for rows, per_row in ((1, False), (3, False), (4, True)):
        fast, slow = KVCache.for_model(model.config, rows, 40, kv), KVCache.for_model(model.config, rows, 40, kv)
        prompt = torch.randint(0, 128, (rows, 8))
        with torch.inference_mode():
            model.hidden(prompt, torch.arange(8), fast)
            model.hidden(prompt, torch.arange(8), slow)
        start = torch.tensor([[8], [10], [12], [9]])[:rows] if per_row else torch.tensor([8])
        for i in range(8):
            tokens = torch.randint(0, 128, (rows,))
            positions = start + i
            with torch.inference_mode():
                got = step(tokens, positions, fast)
            want = _python_step(model, tokens, positions, slow)
            assert (got - want).abs().max().item() < _bound(form, kv, want), (form, rows, per_row, i)
        assert fast.k.dtype == kv
        for a, b in ((fast.k, slow.k), (fast.v, slow.v)):  # fp16: values ~1e-7 apart may round one fp16 step apart
            top = b.abs().max().item()
            bound = 1e-5 if form == "fp32" else 2 ** -7 * top  # two bf16 steps (Gemma 2's cache runs to ~2)
            assert (a.float() - b.float()).abs().max().item() < (bound if kv == torch.float32 else max(bound, 2 ** -10 * top))
        assert fast.length == slow.length


@pytest.mark.parametrize("form", ["int4", "int8"])
def test_gemma3_rows_decoded_in_a_batch_get_the_bits_they_get_alone(built, form):
    """Per-row positions on both sides of the window (6): each row of the batch equals that row decoded
    by itself, bit for bit, in the forms whose matmuls compute each row alone (fp32 runs ATen's GEMM,
    whose summation order depends on the number of rows: within 1e-5 there)."""
    model = _tiny(form, **GEMMA3)
    step = native.stepper(model)
    torch.manual_seed(4)
    lengths = [3, 9, 14]
    prompts = [torch.randint(0, 128, (n,)) for n in lengths]
    batch = KVCache.for_model(model.config, 3, 40, torch.float16)
    alone = [KVCache.for_model(model.config, 1, 40, torch.float16) for _ in lengths]
    with torch.inference_mode():
        for r, (p, cache) in enumerate(zip(prompts, alone)):
            model.hidden(p[None], torch.arange(len(p)), cache)
            model.hidden(p[None], torch.arange(len(p)), batch.rows(r, r + 1))
        for i in range(6):
            tokens = torch.randint(0, 128, (3,))
            positions = torch.tensor([[n + i] for n in lengths])
            together = step(tokens, positions, batch)
            for r, cache in enumerate(alone):
                assert torch.equal(together[r], step(tokens[r : r + 1], positions[r], cache)[0]), (r, i)


@pytest.mark.parametrize("form", ["fp32", "int4"])
def test_native_step_does_not_depend_on_the_thread_count(built, form):
    """Each row is computed by one thread in a fixed order: 1 and 2 threads give the same bits (which
    also keeps a row decoded in a batch bit-identical to the row decoded alone)."""
    model = _tiny(form)
    step = native.stepper(model)
    torch.manual_seed(3)
    prompt = torch.randint(0, 128, (2, 10))
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            cache = KVCache.for_model(model.config, 2, 32)
            with torch.inference_mode():
                model.hidden(prompt, torch.arange(10), cache)
                results.append(torch.stack([step(torch.tensor([3, 4]), torch.tensor([[10 + i], [10 + i]]), cache)
                                            for i in range(5)]))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])


def test_default_model_generates_the_same_text_natively(built, llm):
    prompt = "The three primary colours are"
    assert llm.kernels.name == "native"  # what llmos.load chose
    native_text = llm.generate(prompt, max_new_tokens=24, temperature=0)
    try:
        install(llm.model, PYTORCH)
        python_text = llm.generate(prompt, max_new_tokens=24, temperature=0)
    finally:
        install(llm.model, llm.kernels)
    assert native_text == python_text and len(native_text.strip()) > 0


def test_kernels_are_the_models_own_and_nothing_is_set_at_import(built, monkeypatch):
    """Two models in one process run the kernels installed on each; importing the extension changes
    no other module (a model built without `install` runs PyTorch's everywhere); LLMOS_NATIVE=0 at
    load time gives PyTorch's."""
    plain = Llama(_tiny().config)
    assert plain.kernels is PYTORCH and attention.plan(torch.arange(40), 40, None, plain.kernels).start is None
    fast = _tiny("int4")
    assert fast.kernels.name == "native"
    assert {m.kernels.name for m in fast.modules() if isinstance(m, quant.Int4Linear)} == {"native"}
    assert quant.Int4Linear.kernels is PYTORCH and Llama.kernels is PYTORCH
    monkeypatch.setenv("LLMOS_NATIVE", "0")
    assert native.kernels() is PYTORCH


@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
def test_real_models_decode_logits_match_the_python_step(built, which, fast_llm, gemma3_path):
    """The default models in the form llmos.load picks (int4 layers, int8 head, fp16 cache): the C++
    step's logits match the Python step's within the quantized forms' rounding (measured up to 1.4%),
    with the same greedy token. Gemma 3 decodes from position 522, past the 512-position window of
    five layers in six."""
    import llmos
    from llmos.quality import prompt_ids

    llm = fast_llm if which == "smollm2" else llmos.load(gemma3_path, quiet=True)
    ids = llm.encode("The three primary colours are")
    if which == "gemma3":
        ids = prompt_ids(llm.config.vocab_size)[:40] * 13 + [2000, 3000]  # 522 tokens
    model = llm.model
    step = native.stepper(model)
    assert step is not None
    fast, slow = (KVCache.for_model(model.config, 1, len(ids) + 16, llm.kv_dtype) for _ in range(2))
    with torch.inference_mode():
        model.hidden(torch.tensor([ids]), torch.arange(len(ids)), fast)
        model.hidden(torch.tensor([ids]), torch.arange(len(ids)), slow)
        token = torch.tensor([ids[-1]])
        for i in range(8):
            position = torch.tensor([len(ids) + i])
            got = step(token, position, fast)
            want = _python_step(model, token, position, slow)
            assert (got - want).abs().max().item() < 0.03 * want.abs().max().item(), i
            assert got.argmax() == want.argmax()
            token = want.argmax(-1)


def test_models_outside_the_native_step_use_the_python_step(built):
    gpt2 = GPT2(ModelConfig(arch="gpt2", vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=64,
                            max_seq_len=32, act="gelu_new"))
    assert native.stepper(gpt2) is None
    assert native.stepper(_tiny(rope_dim=8)) is None  # partial rotary


def test_lora_adapters_added_later_are_not_skipped(built):
    model = _tiny()
    cache = KVCache.for_model(model.config, 1, 16)
    tokens = torch.tensor([5])
    before = decode(model, tokens, torch.tensor([0]), cache)
    apply_lora(model, LoraConfig(rank=2))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.normal_()  # a non-zero adapter changes the output
    expected = _python_step(model, tokens, torch.tensor([0]), KVCache.for_model(model.config, 1, 16))
    after = decode(model, tokens, torch.tensor([0]), KVCache.for_model(model.config, 1, 16))
    assert torch.equal(after, expected) and not torch.equal(after, before)


def test_without_a_compiler_generation_still_works(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMOS_HOME", str(tmp_path))  # nothing built here
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(native.EXTENSION, "module", None)
    monkeypatch.setattr(native.EXTENSION, "failed", None)
    assert native.build(quiet=True) is None
    assert "C++ compiler" in native.failure()
    model = _tiny()
    assert model.kernels is PYTORCH  # what kernels() gives without the extension
    cache = KVCache.for_model(model.config, 1, 16)
    got = decode(model, torch.tensor([7]), torch.tensor([0]), cache)
    assert torch.equal(got, _python_step(model, torch.tensor([7]), torch.tensor([0]), KVCache.for_model(model.config, 1, 16)))


def test_a_store_it_cannot_write_to_leaves_the_python_step(tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("LLMOS_HOME", str(blocked))  # the build folder cannot be created under a file
    monkeypatch.setattr(native.EXTENSION, "module", None)
    monkeypatch.setattr(native.EXTENSION, "failed", None)
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


def test_native_causal_attention_equals_sdpa(built):
    """Prompt attention (models/attention.py's native route): queries at consecutive positions after
    any number of cached keys, grouped-query heads, head sizes 16..80, an fp32 or fp16 cache, within
    1e-5 of SDPA over the same (widened) keys and values."""
    torch.manual_seed(7)
    for B, H, Hkv, T, p0, D in ((1, 9, 3, 200, 0, 64), (2, 4, 2, 37, 5, 32), (1, 4, 4, 19, 0, 80), (1, 2, 1, 9, 20, 16)):
        q = torch.randn(B, H, T, D)
        for dtype in (torch.float32, torch.float16):
            k = torch.randn(B, Hkv, p0 + T + 3, D).to(dtype)  # room past the keys used
            v = torch.randn(B, Hkv, p0 + T + 3, D).to(dtype)
            got = built.causal_attention(q, k, v, p0)
            mask = torch.arange(p0 + T)[None, :] <= torch.arange(p0, p0 + T)[:, None]
            want = torch.nn.functional.scaled_dot_product_attention(q, k[:, :, :p0 + T].float(), v[:, :, :p0 + T].float(),
                                                                     attn_mask=mask, enable_gqa=H != Hkv)
            assert (got - want).abs().max().item() < 1e-5, (B, H, Hkv, T, p0, D, dtype)


def test_prompt_prefilled_in_chunks_gets_the_bits_of_one_prefill(built):
    """Each query's attention depends only on its own row and keys: a prompt prefilled in chunks (the
    batched engine) gives the cache and last logits of one whole prefill, bit for bit, at any thread count."""
    model = _tiny("int4")
    prompt = torch.randint(0, 128, (1, 40))
    with torch.inference_mode():
        plan = attention.plan(torch.arange(40), 40, None, model.kernels)
        assert plan.start == 0  # the native route is planned for a prompt
        whole = KVCache.for_model(model.config, 1, 48)
        want = model.output(model.hidden(prompt, torch.arange(40), whole)[:, -1])
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            parts = KVCache.for_model(model.config, 1, 48)
            for a, b in ((0, 13), (13, 14), (14, 40)):
                hidden = model.hidden(prompt[:, a:b], torch.arange(a, b), parts)
        finally:
            torch.set_num_threads(threads)
        got = model.output(hidden[:, -1])
    assert torch.equal(got, want) and torch.equal(parts.k[:, :, :, :40], whole.k[:, :, :, :40])
    with torch.enable_grad():
        assert attention.plan(torch.arange(40), 40, None, model.kernels).start is None  # training keeps SDPA (autograd)


def test_quantized_forms_cache_in_fp16_within_its_rounding(built, fast_llm):
    """The default model in its fast form keeps an fp16 KV cache: decoding gives the greedy tokens and,
    within 3% of the largest logit, the logits of an fp32 cache (as close as the int4 form's native and
    Python steps are to each other; `python -m bench.run --only kv` measures the perplexity cost)."""
    model = fast_llm.model
    assert fast_llm.kv_dtype == torch.float16
    ids = fast_llm.encode("A short story about a lighthouse keeper:")
    caches = [KVCache.for_model(model.config, 1, 64, dtype) for dtype in (torch.float16, torch.float32)]
    with torch.inference_mode():
        outs = [model.output(model.hidden(torch.tensor([ids]), torch.arange(len(ids)), c)[:, -1]) for c in caches]
        for i in range(12):
            assert outs[0].argmax() == outs[1].argmax()
            assert (outs[0] - outs[1]).abs().max().item() < 0.03 * outs[1].abs().max().item()
            token, position = outs[1].argmax(-1).reshape(1), torch.tensor([len(ids) + i])
            outs = [decode(model, token, position, c) for c in caches]


def test_a_prompt_reuses_freed_memory_instead_of_faulting_in_pages(built, fast_llm):
    """native.py keeps glibc from handing multi-MB blocks back to the system on free: a repeated
    512-token prefill reuses the previous one's pages (measured: 0-300 minor page faults a prefill,
    against 6,000-43,000 and ~25% of the prefill time with glibc's defaults)."""
    import resource

    from llmos.quality import prompt_ids

    prompt = prompt_ids(fast_llm.config.vocab_size)
    greedy = SamplingParams(temperature=0.0)
    faults = []
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        list(Generation(fast_llm.model, prompt, max_new_tokens=1, params=greedy, kv_dtype=fast_llm.kv_dtype).tokens())
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    assert min(faults[1:]) < 3000, faults


@pytest.mark.parametrize("heads, kv_heads, dim", [(6, 2, 384), (4, 4, 256), (4, 2, 256), (2, 1, 256), (6, 2, 768)])
def test_native_attention_head_layouts_equal_the_python_step(built, heads, kv_heads, dim):
    """The decode attention's specialised value sums (3, 1 or 2 query heads per kv head of size 64, 2 of
    size 128) and its passes of 64 columns (3 of size 128) give the Python step's logits within 1e-5 in
    fp32."""
    model = _tiny("fp32", n_heads=heads, n_kv_heads=kv_heads, dim=dim)
    step = native.stepper(model)
    assert step is not None
    torch.manual_seed(9)
    fast, slow = KVCache.for_model(model.config, 3, 48), KVCache.for_model(model.config, 3, 48)
    prompt = torch.randint(0, 128, (3, 40))
    with torch.inference_mode():
        model.hidden(prompt, torch.arange(40), fast)
        model.hidden(prompt, torch.arange(40), slow)
        for i in range(3):
            tokens, positions = torch.randint(0, 128, (3,)), torch.tensor([[40 + i], [38 + i], [39 + i]])
            got = step(tokens, positions, fast)
            want = _python_step(model, tokens, positions, slow)
            assert (got - want).abs().max().item() < 1e-5, (heads, kv_heads, dim, i)
