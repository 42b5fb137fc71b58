"""Fixtures for the GGUF reader and dequantization tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from llmos.weights.dequant import GGML_TYPES

# Byte offsets of the f16 scale fields inside one block, per type: random bytes there could be
# NaN/inf, whose payloads numpy and torch need not convert alike, so those fields get real f16s.
_F16_FIELDS = {
    "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
    "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
}


@pytest.fixture(scope="session")
def default_gguf(default_gguf_path) -> Path:
    """The default model file, pulled into the model store on first use."""
    return Path(default_gguf_path)


def _finite_f16(rng: np.random.Generator, n: int) -> np.ndarray:
    # Normal values spread over many binades, including subnormals and zeros, never inf/NaN.
    x = rng.standard_normal(n) * np.exp2(rng.integers(-24, 12, n))
    x[rng.random(n) < 0.02] = 0.0
    return x.astype(np.float16)


def random_blocks(qtype: int, n_blocks: int, seed: int = 0) -> np.ndarray:
    """`n_blocks` valid blocks of GGML type `qtype` as (n_blocks, type_size) uint8: random codes, finite scales."""
    rng = np.random.default_rng(seed)
    name, _, type_size = GGML_TYPES[qtype]
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    if name in ("F16", "BF16", "F32"):
        dtype = {"F16": np.float16, "BF16": np.uint16, "F32": np.float32}[name]
        values = blocks.view(dtype).reshape(-1).copy()
        if name != "BF16":  # BF16 is decoded by a bit shift on both sides, so any pattern is fine
            bad = ~np.isfinite(values)
            values[bad] = rng.standard_normal(int(bad.sum())).astype(dtype)
        return values.view(np.uint8).reshape(n_blocks, type_size)
    for offset in _F16_FIELDS[name]:
        blocks[:, offset : offset + 2] = _finite_f16(rng, n_blocks).view(np.uint8).reshape(n_blocks, 2)
    return blocks


@pytest.fixture(scope="session")
def make_blocks() -> Callable[..., np.ndarray]:
    """Factory: make_blocks(qtype, n_blocks, seed=0) -> (n_blocks, type_size) uint8 of valid blocks."""
    return random_blocks
