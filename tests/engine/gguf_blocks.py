"""Generated GGUF blocks for the kernel tests and the bench: random codes with chosen fp16 scales."""

from __future__ import annotations

import numpy as np

from llmos.weights.dequant import GGML_TYPES

# GGML type id -> byte offsets of the block's fp16 scale fields (d, and m or dmin where the type has one).
HALF_FIELDS: dict[int, tuple[int, ...]] = {2: (0,), 3: (0, 2), 6: (0,), 7: (0, 2), 8: (0,), 12: (0, 2), 13: (0, 2), 14: (208,)}
NAMES = {qtype: GGML_TYPES[qtype][0] for qtype in HALF_FIELDS}


def random_blocks(qtype: int, n: int, k: int, rng: np.random.Generator, scale: str = "random") -> np.ndarray:
    """(n * k / block) blocks of `qtype` as uint8 (n, row_bytes): random codes, scales by `scale`:
    "random" (|d| ~ 1e-3..1e-1, either sign), "small" (2e-5..2e-4: K-quant weights of ~0.1), "zero", "max" (65504, the largest fp16),
    "subnormal" (fp16 subnormals) or "mixed" (all of them, block by block)."""
    _, block, size = GGML_TYPES[qtype]
    count = n * k // block
    raw = rng.integers(0, 256, size=(count, size), dtype=np.uint8)
    for off in HALF_FIELDS[qtype]:
        raw[:, off : off + 2] = _halves(count, scale, rng).view(np.uint8).reshape(count, 2)
    return raw.reshape(n, k // block * size)


def _halves(count: int, scale: str, rng: np.random.Generator) -> np.ndarray:
    kinds = {
        "random": lambda: (rng.uniform(1e-3, 1e-1, count) * rng.choice([-1, 1], count)).astype(np.float16),
        "small": lambda: (rng.uniform(2e-5, 2e-4, count) * rng.choice([-1, 1], count)).astype(np.float16),
        "zero": lambda: np.zeros(count, np.float16),
        "max": lambda: np.full(count, 65504, np.float16) * rng.choice([-1, 1], count).astype(np.float16),
        "subnormal": lambda: rng.integers(1, 1024, count, dtype=np.uint16).view(np.float16),
    }
    if scale != "mixed":
        return kinds[scale]()
    choice = rng.integers(0, 4, count)
    parts = [kinds[name]() for name in ("random", "zero", "max", "subnormal")]
    return np.choose(choice, parts).astype(np.float16)
