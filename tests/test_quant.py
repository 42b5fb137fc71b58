"""Fast weight forms: each within its documented error of fp32, Q4_1 mapped without requantizing,
and `auto` choosing only a form that passes the 2% perplexity rule."""

from __future__ import annotations

import gguf as gguf_ref
import numpy as np
import pytest
import torch
from torch import nn

from llmos import derived, quality, quant
from llmos.weights import loader
from llmos.weights.loader import load_model
from llmos.weights.dequant import q4_1_blocks


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("rows", [1, 7, 64])  # decode (row kernel) and prefill (dense path) sizes
@pytest.mark.parametrize("form, bound", [("bf16", 0.01), ("int8", 0.02), ("int4", 0.12)])
def test_forms_within_documented_error(form, bound, rows):
    torch.manual_seed(0)
    linear = nn.Linear(256, 96, bias=True)
    x = torch.randn(rows, 256)
    ref = linear(x).detach()
    fast = quant.linear_hook(form)("layer", linear.weight.detach(), linear.bias.detach(), None)
    y = fast(x)
    assert y.dtype == torch.float32 and y.shape == ref.shape
    assert _rel_err(y, ref) < bound


def test_int8_row_kernel_equals_dense_path():
    torch.manual_seed(1)
    layer = quant.Int8Linear(torch.randn(64, 128), None)
    x = torch.randn(quant.DENSE_ROWS, 128)
    dense = layer(x)  # >= DENSE_ROWS rows: dequantized bf16 matmul
    rows = torch.cat([layer(x[i:i + 1]) for i in range(x.shape[0])])  # one row at a time: int8 kernel
    assert _rel_err(rows, dense) < 0.01


def test_int4_unpacks_exactly_what_the_kernel_computes():
    """The dense path unpacks PyTorch's int4pack layout itself: the kernel applied to the identity
    matrix returns the weights it uses, and `dequantized()` must equal them."""
    torch.manual_seed(2)
    for n, k in ((64, 32), (128, 96), (192, 160)):
        layer = quant.Int4Linear.from_float(torch.randn(n, k), None)
        eye = torch.eye(k, dtype=torch.bfloat16)
        kernel_weights = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, layer.packed, quant.GROUP, layer.scales_zeros).t()
        ulp = kernel_weights.float().abs() * 2 ** -7  # one bf16 rounding step apart at most
        assert ((layer.dequantized().float() - kernel_weights.float()).abs() <= ulp + 1e-6).all(), (n, k)


def test_native_int4_unpacking_equals_python():
    from llmos.engine import native

    module = native.build(quiet=True)
    assert module is not None, native.failure()
    torch.manual_seed(4)
    layer = quant.Int4Linear.from_float(torch.randn(192, 160), None)
    python = layer.dequantized()  # no buffer given: the Python unpacking
    buffer = torch.empty(192 * 160, dtype=torch.bfloat16)
    module.int4_unpack(layer.packed, layer.scales_zeros, buffer)  # the C++ pass itself
    assert torch.equal(buffer.view(160, 192).t(), python)
    assert torch.equal(layer.dequantized(buffer), python)  # PyTorch's kernels: the Python unpacking into the buffer
    layer.kernels = native.kernels()
    assert torch.equal(layer.dequantized(buffer.clone()), python)  # the native kernels: the C++ pass


def test_int4_row_kernel_equals_dense_path():
    torch.manual_seed(3)
    layer = quant.Int4Linear.from_float(torch.randn(128, 256), torch.randn(128))
    x = torch.randn(quant.INT4_DENSE_ROWS, 256)
    dense = layer(x)  # >= INT4_DENSE_ROWS rows: unpacked bf16 matmul
    rows = torch.cat([layer(x[i:i + 1]) for i in range(x.shape[0])])  # the int4 row kernel
    assert _rel_err(rows, dense) < 0.01
    # An output size the unpacking does not cover (not a multiple of 64) keeps the row kernel.
    w = torch.randn(96, 256)
    odd = quant.Int4Linear.from_float(w, None)
    assert _rel_err(odd(x), x @ w.T) < 0.12


def test_int4_runs_q4_1_blocks_as_they_are():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 128)).astype(np.float32)
    raw = gguf_ref.quants.quantize(w, gguf_ref.GGMLQuantizationType.Q4_1)
    deq = torch.from_numpy(gguf_ref.quants.dequantize(raw, gguf_ref.GGMLQuantizationType.Q4_1).copy())
    d, m, q = q4_1_blocks(np.frombuffer(raw.tobytes(), dtype=np.uint8), (64, 128))
    layer = quant.Int4Linear.from_q4_1(d, m, q)
    x = torch.randn(3, 128)
    # Only bf16 rounding of activations and scales separates the kernel from the exact weights.
    assert _rel_err(layer(x), x @ deq.T) < 0.01
    # Requantizing the dequantized weights instead loses more.
    requant = quant.Int4Linear.from_float(deq, None)
    assert _rel_err(layer(x), x @ deq.T) <= _rel_err(requant(x), x @ deq.T)


def test_convert_keeps_model_output_close(llm):
    ids = llm.encode("The quick brown fox jumps over the lazy dog.")
    ref = llm.logits(ids)
    model, _, _ = load_model(llm.path, "int8")
    with torch.inference_mode():
        got = model(torch.tensor([ids]), torch.arange(len(ids)))[0].float()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8


def test_quality_report_and_auto_pick_a_passing_form(default_gguf_path, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMOS_HOME", str(tmp_path))  # fresh cache: measure, do not read a verdict
    from pathlib import Path

    path = Path(default_gguf_path)
    result = quality.report(path, forms=("int4", "int8"))
    assert result["fp32"]["perplexity"] > 1
    for form in ("int4", "int8"):
        assert result[form]["passes"] == (result[form]["ppl_increase"] <= 0.02)
        assert 0.5 < result[form]["top1_agreement"] <= 1.0
    chosen = quality.auto_form(path)
    assert derived.converted_file(path, chosen).is_file()  # converted while measured, not again at load
    cached = derived.verdict_file(path)
    assert cached.is_file()
    verdict = __import__("json").loads(cached.read_text())
    assert verdict["auto"] == chosen and verdict[chosen]["passes"]
    assert verdict[chosen]["ppl_increase"] <= 0.02


@pytest.mark.parametrize("form", ["int4", "int8", "bf16"])
def test_converted_cache_gives_the_same_model(default_gguf_path, tmp_path, monkeypatch, form):
    monkeypatch.setenv("LLMOS_HOME", str(tmp_path))
    from pathlib import Path

    path = Path(default_gguf_path)
    fresh, _, tok = load_model(path, form)  # converts and writes the cache
    assert list((tmp_path / "converted").glob(f"*-{form}.safetensors"))
    monkeypatch.setattr(loader, "load_gguf", lambda *a, **k: pytest.fail("converted again instead of read back"))
    cached, _, _ = load_model(path, form)  # reads it back
    assert type(cached.output) is type(fresh.output)
    ids = tok.encode("The capital of France is")
    with torch.inference_mode():
        a = fresh(torch.tensor([ids]), torch.arange(len(ids)))
        b = cached(torch.tensor([ids]), torch.arange(len(ids)))
    assert torch.equal(a, b)


def test_damaged_converted_cache_is_rebuilt(default_gguf_path, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMOS_HOME", str(tmp_path))
    from pathlib import Path

    path = Path(default_gguf_path)
    load_model(path, "int8")
    (entry,) = (tmp_path / "converted").glob("*-int8.safetensors")
    entry.write_bytes(b"\x00garbage")
    model, _, tok = load_model(path, "int8")
    ids = tok.encode("Hello")
    with torch.inference_mode():
        assert torch.isfinite(model(torch.tensor([ids]), torch.arange(len(ids)))).all()
    assert entry.stat().st_size > 1000  # rewritten


def test_cli_bench_reports_each_form_and_the_decode_step(default_gguf_path):
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "llmos", "bench", "--model", default_gguf_path, "--forms", "int4",
                          "--tokens", "4", "--threads", "1", "--json"], capture_output=True, text=True, timeout=600, check=True)
    result = json.loads(out.stdout)
    assert result["decode_step"] == "native (C++)"  # CI installs g++: the fast path must be the one measured
    speed = result["speed"]["int4"]
    assert speed["prefill_tps"] > 0 and speed["decode_tps"] > 0 and speed["load_s"] > 0


def test_native_int4_kernel_is_exact_and_row_independent():
    """The decode step's own int4 matmul (native_step.cpp, int4_mm) reads the int4pack bytes as they are:
    its result is the exact product of the bf16 activations and the int4 weights up to fp32 rounding
    (ATen's kernel rounds to bf16), and each row's bits do not depend on the other rows or on threads."""
    from llmos.engine import native

    module = native.build(quiet=True)
    assert module is not None, native.failure()
    if not hasattr(module, "int4_mm"):
        pytest.skip("this CPU lacks AVX512-BF16/VBMI: the decode step uses ATen's int4 kernel")
    torch.manual_seed(5)
    for n, k in ((64, 32), (192, 160), (960, 576)):
        layer = quant.Int4Linear.from_float(torch.randn(n, k), None)
        exact_weights = layer.dequantized().double()  # (q - 8) * scale + zero, rounded to bf16 ...
        q_scale, q_zero = layer.scales_zeros.double().unbind(-1)  # ... so rebuild them in double
        base = (q_zero - 8 * q_scale).t().repeat_interleave(quant.GROUP, 1)
        scale = q_scale.t().repeat_interleave(quant.GROUP, 1)
        q = ((exact_weights - base) / scale).round()
        weights = q * scale + base  # (n, k) in double
        for rows in (1, 5, 16, 31):
            x = torch.randn(rows, k).to(torch.bfloat16)
            y = module.int4_mm(x, layer.packed, layer.scales_zeros)
            want = x.double() @ weights.t()
            assert y.dtype == torch.float32 and y.shape == (rows, n)
            assert (y.double() - want).abs().max().item() < 1e-5 * want.abs().max().item() + 1e-6, (n, k, rows)
            aten = torch.ops.aten._weight_int4pack_mm_for_cpu(x, layer.packed, quant.GROUP, layer.scales_zeros).double()
            assert (aten - want).abs().max().item() < 2 ** -7 * want.abs().max().item()  # ATen: one bf16 rounding
            alone = torch.cat([module.int4_mm(x[i:i + 1], layer.packed, layer.scales_zeros) for i in range(rows)])
            assert torch.equal(y, alone)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = module.int4_mm(x, layer.packed, layer.scales_zeros)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, y)


@pytest.mark.parametrize("kernel", ["int8_mm", "int8_linear_mm"])
def test_native_int8_kernels_are_exact_and_row_independent(kernel):
    """The decode step's int8 matmuls, for the vocabulary head (int8_mm, over int8_pack's layout) and
    for Int8Linear's layers (int8_linear_mm, over its (N, K) weights as they are): the exact product of
    bf16 activations and int8 weights times their scales up to fp32 rounding, each row's bits independent
    of the other rows and of the thread count."""
    from llmos.engine import native

    module = native.build(quiet=True)
    assert module is not None, native.failure()
    if not hasattr(module, kernel):
        pytest.skip("this CPU lacks AVX512-BF16/VBMI: the decode step uses ATen's int8 kernel")
    torch.manual_seed(6)
    threads = torch.get_num_threads()
    for n, k in ((64, 32), (320, 576), (1536, 640)):
        layer = quant.Int8Linear(torch.randn(n, k), None)
        weight = module.int8_pack(layer.qweight) if kernel == "int8_mm" else layer.qweight
        fn = getattr(module, kernel)
        weights = layer.qweight.double() * layer.scale.double()[:, None]
        for rows in (1, 7, 16):
            x = torch.randn(rows, k).to(torch.bfloat16)
            y = fn(x, weight, layer.scale)
            want = x.double() @ weights.t()
            assert (y.double() - want).abs().max().item() < 1e-5 * want.abs().max().item(), (n, k, rows)
            alone = torch.cat([fn(x[i:i + 1], weight, layer.scale) for i in range(rows)])
            assert torch.equal(y, alone)
            try:
                torch.set_num_threads(1 if threads > 1 else 2)
                assert torch.equal(fn(x, weight, layer.scale), y)
            finally:
                torch.set_num_threads(threads)
