"""Dequantize GGML tensor data (the payload of a GGUF tensor) to float32.

Contract: `dequantize(raw, qtype, shape)` takes the tensor's bytes exactly as stored in the file and
returns a float32 tensor of `shape` (PyTorch order: the last dim is the GGML row, the one blocks run
along). The result is bit-for-bit what gguf-py's `gguf.quants.dequantize` returns: every type below
performs the same float32 operations in the same order (scale products first, then `d * q`, then the
offset), never fused, so no rounding differs. F32 is returned as a zero-copy view when the input is
writable; everything else is a fresh tensor.

The `*_blocks` helpers expose the raw scales and codes of the 32-element formats without expanding
them, for a fast int4/int8 matmul path: they hold the same numbers `dequantize` multiplies out.

Block layouts (little-endian, one block after another along each row):
  Q4_0 (32 el, 18 B): d f16 | 16 B nibbles; element j <- low nibble of byte j, j+16 <- high nibble. w = d*(q-8)
  Q4_1 (32 el, 20 B): d f16 | m f16 | 16 B nibbles as Q4_0.                                          w = d*q + m
  Q5_0 (32 el, 22 B): d f16 | qh u32 (bit j = 5th bit of element j) | 16 B nibbles.                 w = d*(q-16)
  Q5_1 (32 el, 24 B): d f16 | m f16 | qh u32 | 16 B nibbles.                                        w = d*q + m
  Q8_0 (32 el, 34 B): d f16 | 32 x int8.                                                            w = d*q
  Q4_K (256 el, 144 B): d f16 | dmin f16 | 12 B packed 6-bit (scale, min) x 8 | 128 B nibbles; each
        32-byte chunk c holds sub-block 2c in its low nibbles and 2c+1 in its high nibbles.
        w = (d*scale_s)*q - dmin*min_s
  Q5_K (256 el, 176 B): as Q4_K with 32 B of high bits after the scales: bit s of byte j is the 5th
        bit of element j of sub-block s.
  Q6_K (256 el, 210 B): 128 B low nibbles | 64 B high 2-bit pairs | 16 x int8 scales | d f16.
        w = (d*scale_16)*(q-32), one scale per 16 elements.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from llmos.errors import LlmosError

# GGML type id -> (name, block size in elements, bytes per block), for the types llmos dequantizes.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    30: ("BF16", 1, 2),
}

# Every GGML type id known to exist, so a refusal can name what the file holds.
GGML_TYPE_NAMES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 4: "Q4_2 (removed)", 5: "Q4_3 (removed)", 6: "Q5_0",
    7: "Q5_1", 8: "Q8_0", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K",
    15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S",
    22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M",
    30: "BF16", 31: "Q4_0_4_4 (removed)", 32: "Q4_0_4_8 (removed)", 33: "Q4_0_8_8 (removed)",
    34: "TQ1_0", 35: "TQ2_0", 36: "IQ4_NL_4_4 (removed)", 37: "IQ4_NL_4_8 (removed)",
    38: "IQ4_NL_8_8 (removed)", 39: "MXFP4", 40: "NVFP4", 41: "Q1_0",
}

# Blocks per chunk aim at ~256K output elements, so a chunk's intermediates stay in cache and each
# in-place pass below streams over cache-resident memory instead of the whole tensor.
_CHUNK_ELEMENTS = 1 << 18


def type_name(qtype: int) -> str:
    """A readable name for a GGML type id, known or not."""
    return GGML_TYPE_NAMES.get(qtype, f"unknown type {qtype}")


def supported_type_names() -> str:
    """The supported types, comma-separated, for error messages."""
    return ", ".join(name for name, _, _ in GGML_TYPES.values())


def dequantize(raw: np.ndarray | torch.Tensor, qtype: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Expand the stored bytes of a GGML tensor into float32 of `shape` (PyTorch order)."""
    data, writable = _as_uint8(raw)
    name, block, _ = _check(data, qtype, shape)
    if name == "F32":
        out = data.view(torch.float32)
        # A view into a read-only buffer would let a caller write into memory nobody may write.
        return (out if writable else out.clone()).view(shape)
    if name == "F16":
        return data.view(torch.float16).to(torch.float32).view(shape)
    if name == "BF16":
        # bf16 is the top half of an f32: shift the bits up instead of converting, so NaN payloads
        # survive exactly as gguf-py keeps them.
        return (data.view(torch.int16).to(torch.int32) << 16).view(torch.float32).view(shape)
    blocks = _blocks(data, qtype)  # (n_blocks, type_size)
    out = torch.empty(blocks.shape[0], block, dtype=torch.float32)  # (n_blocks, block)
    fill = _FILL[name]
    step = max(1, _CHUNK_ELEMENTS // block)
    for start in range(0, blocks.shape[0], step):
        fill(blocks[start : start + step], out[start : start + step])
    return out.view(shape)


def q4_0_blocks(raw: np.ndarray | torch.Tensor, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0 as (d, q): d (rows, n_blocks) f32, q (rows, cols) uint8 in 0..15; w = d * (q - 8) per 32-block."""
    rows, cols, blocks = _row_blocks(raw, 2, shape)
    d = _f16(blocks, 0).view(rows, cols // 32)
    return d, _nibbles(blocks[:, 2:18]).view(rows, cols)


def q4_1_blocks(
    raw: np.ndarray | torch.Tensor, shape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_1 as (d, m, q): d and m (rows, n_blocks) f32, q (rows, cols) uint8 in 0..15; w = d * q + m per 32-block."""
    rows, cols, blocks = _row_blocks(raw, 3, shape)
    d = _f16(blocks, 0).view(rows, cols // 32)
    m = _f16(blocks, 2).view(rows, cols // 32)
    return d, m, _nibbles(blocks[:, 4:20]).view(rows, cols)


def q4_k_blocks(
    raw: np.ndarray | torch.Tensor, shape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_K as Q4_1-shaped (d, m, q) per 32-element sub-block: d = d * scale, m = -dmin * min
    (rows, cols / 32) f32, q (rows, cols) uint8 in 0..15; w = d * q + m, the values `dequantize` gives."""
    rows, cols, blocks = _row_blocks(raw, 12, shape)
    d, dm = _k_factors(blocks)  # (n, 8, 1) each
    return d.view(rows, cols // 32), (-dm).view(rows, cols // 32), _k_nibbles(blocks[:, 16:144]).reshape(rows, cols)


def q8_0_blocks(raw: np.ndarray | torch.Tensor, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0 as (d, q): d (rows, n_blocks) f32, q (rows, cols) int8; w = d * q per 32-block."""
    rows, cols, blocks = _row_blocks(raw, 8, shape)
    d = _f16(blocks, 0).view(rows, cols // 32)
    return d, blocks[:, 2:34].view(torch.int8).reshape(rows, cols)


# --- plumbing ---------------------------------------------------------------------------------


def _as_uint8(raw: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Flat uint8 tensor over the same memory, and whether that memory may be written."""
    if isinstance(raw, torch.Tensor):
        if raw.dtype != torch.uint8:
            raise LlmosError(f"dequantize expects the raw bytes as uint8, got a {raw.dtype} tensor")
        return raw.reshape(-1), True
    arr = np.asarray(raw)
    if arr.dtype != np.uint8:
        raise LlmosError(f"dequantize expects the raw bytes as uint8, got a {arr.dtype} array")
    arr = arr.reshape(-1)
    with warnings.catch_warnings():
        # torch warns on read-only arrays; nothing here writes to `raw`, and F32 clones it (above).
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr), bool(arr.flags.writeable)


def _check(data: torch.Tensor, qtype: int, shape: tuple[int, ...]) -> tuple[str, int, int]:
    if qtype not in GGML_TYPES:
        raise LlmosError(
            f"cannot dequantize GGML type {type_name(qtype)} (id {qtype}); supported: {supported_type_names()}"
        )
    name, block, size = GGML_TYPES[qtype]
    if len(shape) == 0 or any(n < 0 for n in shape):
        raise LlmosError(f"cannot dequantize to shape {tuple(shape)}: need at least one non-negative dim")
    if shape[-1] % block:
        raise LlmosError(
            f"{name} rows must be a multiple of {block} elements, but shape {tuple(shape)} has rows of {shape[-1]}"
        )
    expected = math.prod(shape) // block * size
    if data.numel() != expected:
        raise LlmosError(f"{name} tensor of shape {tuple(shape)} needs {expected} bytes, got {data.numel()}")
    return name, block, size


def _blocks(data: torch.Tensor, qtype: int) -> torch.Tensor:
    size = GGML_TYPES[qtype][2]
    return data.view(data.numel() // size, size)  # (n_blocks, type_size)


def _row_blocks(raw: np.ndarray | torch.Tensor, qtype: int, shape: tuple[int, ...]) -> tuple[int, int, torch.Tensor]:
    data, _ = _as_uint8(raw)
    _check(data, qtype, shape)
    cols = shape[-1]
    return math.prod(shape) // cols, cols, _blocks(data, qtype)


def _f16(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The f16 field at byte `offset` of every block, as f32 (n_blocks, 1)."""
    return blocks[:, offset : offset + 2].view(torch.float16).to(torch.float32)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """16 packed bytes per block -> 32 codes: low nibbles first, then high nibbles (n, 32) uint8."""
    q = torch.empty(qs.shape[0], 2, 16, dtype=torch.uint8)  # (n, half, 16)
    torch.bitwise_and(qs, 15, out=q[:, 0])
    torch.bitwise_right_shift(qs, 4, out=q[:, 1])
    return q.view(-1, 32)


_BIT_SHIFTS = torch.arange(8, dtype=torch.uint8)


def _bits32(qh: torch.Tensor) -> torch.Tensor:
    """A little-endian u32 of 4 bytes per block -> its 32 bits as (n, 32) uint8, bit j at column j."""
    return ((qh.unsqueeze(-1) >> _BIT_SHIFTS) & 1).view(-1, 32)  # (n, 4 bytes, 8 bits) -> (n, 32)


def _k_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack Q4_K/Q5_K's 12 bytes into 8 six-bit scales and 8 six-bit mins, each (n, 8) uint8.

    Bytes 0-3 hold scales 0-3 in their low 6 bits, bytes 4-7 mins 0-3; scales and mins 4-7 keep their
    low 4 bits in bytes 8-11 (scale low nibble, min high nibble) and their top 2 bits in the spare
    top bits of bytes 0-3 and 4-7 respectively.
    """
    s = scales.reshape(-1, 3, 4)  # (n, 3, 4)
    a, b, c = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([a & 63, (c & 15) | ((a >> 2) & 48)], dim=1)
    mn = torch.cat([b & 63, (c >> 4) | ((b >> 2) & 48)], dim=1)
    return sc, mn


# --- per-type block fillers: blocks (n, type_size) uint8 -> out (n, block) f32 ------------------


def _fill_q4_0(b: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(_nibbles(b[:, 2:18]))
    out.sub_(8).mul_(_f16(b, 0))


def _fill_q4_1(b: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(_nibbles(b[:, 4:20]))
    out.mul_(_f16(b, 0)).add_(_f16(b, 2))


def _fill_q5_0(b: torch.Tensor, out: torch.Tensor) -> None:
    q = _nibbles(b[:, 6:22]) | (_bits32(b[:, 2:6]) << 4)
    out.copy_(q)
    out.sub_(16).mul_(_f16(b, 0))


def _fill_q5_1(b: torch.Tensor, out: torch.Tensor) -> None:
    q = _nibbles(b[:, 8:24]) | (_bits32(b[:, 4:8]) << 4)
    out.copy_(q)
    out.mul_(_f16(b, 0)).add_(_f16(b, 2))


def _fill_q8_0(b: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(b[:, 2:34].view(torch.int8))
    out.mul_(_f16(b, 0))


def _k_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """128 packed bytes -> 256 codes: chunk c of 32 bytes gives sub-block 2c (low), 2c+1 (high)."""
    n = qs.shape[0]
    chunks = qs.reshape(n, 4, 32)  # (n, chunk, 32)
    q = torch.empty(n, 4, 2, 32, dtype=torch.uint8)  # (n, chunk, low/high, 32)
    torch.bitwise_and(chunks, 15, out=q[:, :, 0])
    torch.bitwise_right_shift(chunks, 4, out=q[:, :, 1])
    return q.view(n, 8, 32)  # (n, sub-block, 32)


def _k_factors(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K per-sub-block factors: (d * scale, dmin * min), each (n, 8, 1) f32."""
    sc, mn = _k_scales(b[:, 4:16])
    return (_f16(b, 0) * sc).unsqueeze(-1), (_f16(b, 2) * mn).unsqueeze(-1)


def _fill_q4_k(b: torch.Tensor, out: torch.Tensor) -> None:
    d, dm = _k_factors(b)
    o = out.view(-1, 8, 32)  # (n, sub-block, 32)
    o.copy_(_k_nibbles(b[:, 16:144]))
    o.mul_(d).sub_(dm)


def _fill_q5_k(b: torch.Tensor, out: torch.Tensor) -> None:
    d, dm = _k_factors(b)
    high = (b[:, 16:48].unsqueeze(1) >> _BIT_SHIFTS.view(1, 8, 1)) & 1  # (n, sub-block, 32)
    o = out.view(-1, 8, 32)  # (n, sub-block, 32)
    o.copy_(_k_nibbles(b[:, 48:176]) | (high << 4))
    o.mul_(d).sub_(dm)


_Q6_SHIFTS = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)


def _fill_q6_k(b: torch.Tensor, out: torch.Tensor) -> None:
    n = b.shape[0]
    # Each 128-element half h takes 64 bytes of ql (low nibbles -> elements 0-63, high -> 64-127)
    # and 32 bytes of qh (2-bit pair t of byte j -> element 32t + j).
    ql = b[:, :128].reshape(n, 2, 64)  # (n, half, 64)
    low = torch.empty(n, 2, 2, 64, dtype=torch.uint8)  # (n, half, low/high nibble, 64)
    torch.bitwise_and(ql, 15, out=low[:, :, 0])
    torch.bitwise_right_shift(ql, 4, out=low[:, :, 1])
    high = (b[:, 128:192].reshape(n, 2, 1, 32) >> _Q6_SHIFTS) & 3  # (n, half, pair, 32)
    q = low.view(n, 256) | (high.view(n, 256) << 4)  # (n, 256) in 0..63
    d = (_f16(b, 208) * b[:, 192:208].view(torch.int8)).unsqueeze(-1)  # (n, 16, 1)
    o = out.view(n, 16, 16)  # (n, 16-group, 16)
    o.copy_(q.view(n, 16, 16))
    o.sub_(32).mul_(d)


_FILL = {
    "Q4_0": _fill_q4_0,
    "Q4_1": _fill_q4_1,
    "Q5_0": _fill_q5_0,
    "Q5_1": _fill_q5_1,
    "Q8_0": _fill_q8_0,
    "Q4_K": _fill_q4_k,
    "Q5_K": _fill_q5_k,
    "Q6_K": _fill_q6_k,
}
