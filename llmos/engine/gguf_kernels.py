"""Matrix products over a GGUF file's own quantized blocks (gguf_kernels.cpp), for Q4_0, Q4_1, Q5_0,
Q5_1, Q8_0, Q4_K, Q5_K and Q6_K: `matmul(x, raw, qtype, n)` is x (M, K) fp32 @ W^T -> (M, N) fp32 with W
given as the tensor's bytes exactly as stored (a view of the memory map: nothing is repacked or
copied), and `dequantize(raw, qtype, out)` writes W into a caller's fp32 or bf16 (N, K) buffer.

Contract: the weights multiplied are bit for bit `gguf.quants.dequantize` of the blocks (no second
rounding); the result differs from `x @ dequantize(W).T` in fp32 only by summation order; every
(row, output) pair is computed by the same operations whatever the number of rows or threads, so a
row computed in a batch has the bits it has alone. AVX-512 where the CPU has it, a portable C++ loop
otherwise.

The extension is compiled once per source, flags, PyTorch version and CPU (about 20 s with g++) into
$LLMOS_HOME/native, as engine/native.py compiles the decode step; without a compiler, with a store it
cannot write, or with LLMOS_NATIVE=0, `build()` returns None (the reason in `failure()`) and
`matmul`/`dequantize` return None/False so callers take the Python path (weights/dequant.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from llmos.engine import extension

SOURCE = Path(__file__).with_name("gguf_kernels.cpp")
NAME = "llmos_gguf_kernels"
# GGML type ids the kernels read (dequant.GGML_TYPES names them).
QTYPES = frozenset({2, 3, 6, 7, 8, 12, 13, 14})
# Built with extension.CFLAGS: -march=native gives the AVX-512 path where the CPU has it (the build
# folder is named by the CPU's flags); -ffp-contract=off because the weights must be rebuilt with
# gguf-py's separate multiply and add, never a fused multiply-add (one rounding where gguf-py has two).
EXTENSION = extension.Extension(NAME, SOURCE, prefix="gguf-", what="the GGUF block kernels",
                                fallback="the Python path for GGUF blocks", seconds=30)
enabled = extension.enabled
failure = EXTENSION.failure


def build(quiet: bool = False):
    """Compile (once) and import the extension; None when it cannot be built (reason in `failure()`)."""
    return EXTENSION.build(quiet)


def supported(qtype: int) -> bool:
    return qtype in QTYPES


def matmul(x: torch.Tensor, raw: torch.Tensor, qtype: int, n: int) -> torch.Tensor | None:
    """x (M, K) fp32 @ W^T -> (M, n) fp32, W (n, K) the GGML blocks `raw` (contiguous uint8); None where
    the extension is not available."""
    module = build() if enabled() else None
    return None if module is None else module.matmul(x, raw, qtype, n)


def dequantize(raw: torch.Tensor, qtype: int, out: torch.Tensor) -> bool:
    """The weights of `raw` into `out` ((N, K) fp32, gguf-py's values, or bf16, those rounded once);
    False where the extension is not available."""
    module = build() if enabled() else None
    if module is None:
        return False
    module.dequantize(raw, qtype, out)
    return True


if __name__ == "__main__":  # `python -m llmos.engine.gguf_kernels`: build it now
    if build() is None:
        print(f"llmos: {failure() or 'native kernels disabled (LLMOS_NATIVE=0)'}", file=sys.stderr)
