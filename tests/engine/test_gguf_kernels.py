"""The GGUF block kernels (engine/gguf_kernels.py) against gguf-py's dequantization: the weights they
multiply are gguf's bit for bit, products differ from an fp32 matmul only by summation order, and a
row in a batch gets the bits it gets alone. On generated blocks (random codes; zero, largest and
subnormal fp16 scales) and on real tensors of the default models' files where the store has them
(generated stand-ins where it does not: these tests never skip)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from llmos.engine import gguf_kernels
from llmos.weights.dequant import GGML_TYPES
from llmos.weights.gguf import GGUFFile
from tests.engine.gguf_blocks import NAMES, random_blocks

TYPES = sorted(NAMES)
ROWS = (1, 3, 4, 5, 16)  # 4 and 5: the last tile read straight from the blocks, the first dequantized into a buffer


@pytest.fixture(scope="module")
def kernels():
    module = gguf_kernels.build(quiet=True)
    assert module is not None, gguf_kernels.failure()  # g++ is installed where the tests run
    return module


def reference(raw: np.ndarray, qtype: int, n: int, k: int) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(raw.reshape(-1), qtype).reshape(n, k).astype(np.float32))


def check_products(raw: np.ndarray, qtype: int, n: int, k: int, seed: int = 0) -> float:
    """Kernel vs fp64 of the reference weights for 1, 3 and 16 rows, error relative to sum |x||w|
    (fp32 summation order only: < 1e-5); batched rows equal solo rows bit for bit. Returns the largest
    relative error."""
    w = reference(raw, qtype, n, k).double()
    data = torch.from_numpy(np.ascontiguousarray(raw).reshape(-1))
    x = torch.randn(max(ROWS), k, generator=torch.Generator().manual_seed(seed))
    solo = [gguf_kernels.matmul(x[i : i + 1], data, qtype, n) for i in range(x.shape[0])]
    worst = 0.0
    for m in ROWS:
        y = gguf_kernels.matmul(x[:m], data, qtype, n)
        exact = x[:m].double() @ w.T
        bound = x[:m].double().abs() @ w.abs().T
        finite = torch.isfinite(exact)
        assert torch.equal(torch.isfinite(y), finite)
        err = ((y.double() - exact).abs() / bound.clamp(min=1e-300))[finite]
        worst = max(worst, err.max().item() if err.numel() else 0.0)
        for i in range(m):
            assert torch.equal(y[i : i + 1], solo[i]), f"{NAMES[qtype]}: row {i} of {m} differs from its solo result"
    assert worst < 1e-5, f"{NAMES[qtype]}: relative error {worst}"
    return worst


@pytest.mark.parametrize("scale", ["random", "zero", "max", "subnormal", "mixed"])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: NAMES[t])
def test_weights_are_gguf_dequantization_bit_for_bit(kernels, qtype, scale):
    """One-hot rows make the kernel return each weight it multiplies (w * 1 plus exact zeros)."""
    n, k = 8, 512
    raw = random_blocks(qtype, n, k, np.random.default_rng(qtype), scale)
    ref = reference(raw, qtype, n, k)
    got = gguf_kernels.matmul(torch.eye(k), torch.from_numpy(raw.reshape(-1)), qtype, n)  # (k, n) = W^T
    assert torch.equal(got.T.contiguous().view(torch.int32), (ref + 0.0).view(torch.int32)), NAMES[qtype]  # + 0.0: -0 -> +0, as 0 + -0 is
    for dtype in (torch.float32, torch.bfloat16):
        out = torch.empty(n, k, dtype=dtype)
        assert gguf_kernels.dequantize(torch.from_numpy(raw.reshape(-1)), qtype, out)
        assert torch.equal(out.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                           ref.to(dtype).view(torch.int16 if dtype == torch.bfloat16 else torch.int32))


@pytest.mark.parametrize("scale", ["random", "mixed"])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: NAMES[t])
def test_products_on_generated_blocks(kernels, qtype, scale):
    # 70 outputs: the tiles of 4 and 2 outputs and the remainder; K of several blocks.
    k = 1024 if GGML_TYPES[qtype][1] == 256 else 320
    check_products(random_blocks(qtype, 70, k, np.random.default_rng(100 + qtype), scale), qtype, 70, k)


def _store_files() -> list[Path]:
    from llmos.store import home

    models = home() / "models"
    return [*models.glob("smollm2-135m-instruct/*.gguf"), *models.glob("gemma3-270m/*.gguf")]


def _real_tensors() -> dict[int, tuple[str, np.ndarray, int, int]]:
    """Per type, the first 48 rows of one tensor of that type from the default models' files; a
    stand-in where no file in the store has it (gguf's own quantizer where it has one for the type,
    random blocks otherwise)."""
    found: dict[int, tuple[str, np.ndarray, int, int]] = {}
    for path in _store_files():
        with GGUFFile(path) as f:
            for info in f.tensors.values():
                if info.qtype in NAMES and info.qtype not in found and len(info.shape) == 2:
                    n, k = info.shape
                    rows = min(n, 48)
                    raw = f.raw(info.name).reshape(n, -1)[:rows].copy()  # a copy: the map closes
                    found[info.qtype] = (f"{path.name}:{info.name}", raw, rows, k)
    rng = np.random.default_rng(7)
    for qtype in TYPES:
        if qtype not in found:
            try:
                raw = gguf.quants.quantize(rng.standard_normal((48, 512)).astype(np.float32) * 0.05, qtype)
                found[qtype] = ("gguf.quants.quantize", raw, 48, 512)
            except (NotImplementedError, gguf.quants.QuantError):  # gguf 0.19 has no K-quant quantizer
                found[qtype] = ("random blocks", random_blocks(qtype, 48, 512, rng), 48, 512)
    return found


REAL = _real_tensors()


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: NAMES[t])
def test_products_on_real_tensors(kernels, qtype):
    source, raw, n, k = REAL[qtype]
    check_products(raw, qtype, n, k, seed=qtype)


def test_disabled_returns_none(monkeypatch):
    monkeypatch.setenv("LLMOS_NATIVE", "0")
    raw = random_blocks(8, 2, 32, np.random.default_rng(0))
    assert gguf_kernels.matmul(torch.ones(1, 32), torch.from_numpy(raw.reshape(-1)), 8, 2) is None
