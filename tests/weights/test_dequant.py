"""Dequantization is bit-for-bit gguf-py's (the reference), for every supported type and shape."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize as ref_dequantize
from gguf.quants import quantize as ref_quantize

from llmos.errors import LlmosError
from llmos.weights.dequant import GGML_TYPES, dequantize, q4_0_blocks, q4_1_blocks, q4_k_blocks, q8_0_blocks
from llmos.weights.gguf import GGUFFile

# Shapes in PyTorch order; each row is a whole number of 256-element blocks so every type fits.
SHAPES = [(256,), (3, 512), (2, 3, 256), (67, 768)]


def assert_bits_equal(got: torch.Tensor, ref: np.ndarray) -> None:
    assert got.dtype == torch.float32
    assert tuple(got.shape) == ref.shape
    ref32 = np.ascontiguousarray(ref, dtype=np.float32)
    # Compare bit patterns, so -0.0 vs 0.0 or any rounding difference fails.
    assert np.array_equal(got.contiguous().numpy().view(np.uint32), ref32.view(np.uint32))


def reference(blocks: np.ndarray, qtype: int, shape: tuple[int, ...]) -> np.ndarray:
    _, block, type_size = GGML_TYPES[qtype]
    raw = blocks.reshape(*shape[:-1], shape[-1] // block * type_size)  # gguf-py's byte shape
    return ref_dequantize(raw, GGMLQuantizationType(qtype))


def test_supported_types_match_gguf_sizes() -> None:
    from gguf.constants import GGML_QUANT_SIZES

    assert set(GGML_TYPES) == {0, 1, 2, 3, 6, 7, 8, 12, 13, 14, 30}
    for qtype, (name, block, type_size) in GGML_TYPES.items():
        assert GGMLQuantizationType(qtype).name == name
        assert GGML_QUANT_SIZES[GGMLQuantizationType(qtype)] == (block, type_size)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("qtype", list(GGML_TYPES), ids=lambda t: GGML_TYPES[t][0])
def test_random_blocks_match_reference(make_blocks, qtype: int, shape: tuple[int, ...]) -> None:
    _, block, _ = GGML_TYPES[qtype]
    blocks = make_blocks(qtype, int(np.prod(shape)) // block, seed=qtype * 100 + len(shape))
    assert_bits_equal(dequantize(blocks.reshape(-1), qtype, shape), reference(blocks, qtype, shape))


@pytest.mark.parametrize("qtype", list(GGML_TYPES), ids=lambda t: GGML_TYPES[t][0])
def test_spans_several_chunks(make_blocks, qtype: int) -> None:
    # More than one internal chunk (256K elements), with a ragged last one.
    shape = (1100, 256)
    _, block, _ = GGML_TYPES[qtype]
    blocks = make_blocks(qtype, 1100 * 256 // block, seed=7)
    assert_bits_equal(dequantize(blocks, qtype, shape), reference(blocks, qtype, shape))


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "BF16"])
def test_reference_quantized_values_round_trip(name: str) -> None:
    # Blocks written by gguf-py's own quantizer (real scale/code statistics, not random bytes).
    qtype = GGMLQuantizationType[name]
    x = np.random.default_rng(1).standard_normal((16, 256)).astype(np.float32)
    packed = ref_quantize(x, qtype)
    assert_bits_equal(dequantize(packed, int(qtype), x.shape), ref_dequantize(packed, qtype))


def test_accepts_torch_and_numpy_alike(make_blocks) -> None:
    blocks = make_blocks(12, 6, seed=3)
    from_np = dequantize(blocks, 12, (3, 512))
    from_torch = dequantize(torch.from_numpy(blocks.copy()), 12, (3, 512))
    assert torch.equal(from_np, from_torch)


def test_f32_read_only_input_is_copied_not_aliased() -> None:
    x = np.arange(8, dtype=np.float32)
    raw = x.view(np.uint8)
    raw.flags.writeable = False
    out = dequantize(raw, 0, (2, 4))
    out += 1  # must be possible, and must not reach the read-only source
    assert x[0] == 0.0 and out[0, 0] == 1.0


def test_f32_writable_input_is_a_view() -> None:
    raw = np.arange(4, dtype=np.float32).view(np.uint8).copy()
    out = dequantize(raw, 0, (4,))
    assert out.data_ptr() == raw.ctypes.data


def test_zero_sized_tensor() -> None:
    assert dequantize(np.zeros(0, np.uint8), 3, (0, 64)).shape == (0, 64)


def test_q4_0_blocks_rebuild_dequantize(make_blocks) -> None:
    shape = (5, 128)
    blocks = make_blocks(2, 5 * 4, seed=11)
    d, q = q4_0_blocks(blocks, shape)
    assert d.shape == (5, 4) and d.dtype == torch.float32
    assert q.shape == shape and q.dtype == torch.uint8 and int(q.max()) <= 15
    w = d.repeat_interleave(32, dim=1) * (q.float() - 8)
    assert_bits_equal(w, reference(blocks, 2, shape))


def test_q4_1_blocks_rebuild_dequantize(make_blocks) -> None:
    shape = (5, 128)
    blocks = make_blocks(3, 5 * 4, seed=12)
    d, m, q = q4_1_blocks(blocks, shape)
    assert d.shape == m.shape == (5, 4)
    assert q.shape == shape and q.dtype == torch.uint8 and int(q.max()) <= 15
    w = d.repeat_interleave(32, dim=1) * q.float() + m.repeat_interleave(32, dim=1)
    assert_bits_equal(w, reference(blocks, 3, shape))


def test_q8_0_blocks_rebuild_dequantize(make_blocks) -> None:
    shape = (5, 128)
    blocks = make_blocks(8, 5 * 4, seed=13)
    d, q = q8_0_blocks(blocks, shape)
    assert d.shape == (5, 4) and q.shape == shape and q.dtype == torch.int8
    w = d.repeat_interleave(32, dim=1) * q.float()
    assert_bits_equal(w, reference(blocks, 8, shape))


def test_block_helpers_refuse_other_layouts(make_blocks) -> None:
    with pytest.raises(LlmosError, match="needs 80 bytes, got 72"):
        q4_1_blocks(make_blocks(2, 4, seed=0), (1, 128))  # Q4_0 bytes are too short for Q4_1


def test_refuses_unsupported_type() -> None:
    with pytest.raises(LlmosError, match=r"IQ2_XXS.*supported: F32"):
        dequantize(np.zeros(66, np.uint8), 16, (256,))


def test_refuses_wrong_byte_count() -> None:
    with pytest.raises(LlmosError, match="needs 40 bytes, got 39"):
        dequantize(np.zeros(39, np.uint8), 3, (2, 32))


def test_refuses_rows_not_a_multiple_of_the_block() -> None:
    with pytest.raises(LlmosError, match="multiple of 256"):
        dequantize(np.zeros(144, np.uint8), 12, (2, 128))


def test_refuses_non_byte_input() -> None:
    with pytest.raises(LlmosError, match="uint8"):
        dequantize(np.zeros(4, np.float32), 0, (4,))


@pytest.fixture(scope="module")
def default_reader(default_gguf) -> GGUFReader:
    return GGUFReader(default_gguf)  # ~2 s to parse the vocabulary: once per module


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["token_embd.weight", "first Q4_1", "first F32"])
def test_default_model_tensors_match_reference(default_gguf, default_reader, kind: str) -> None:
    reader = default_reader
    if kind.startswith("first"):
        qtype = GGMLQuantizationType[kind.split()[1]]
        ref = next(t for t in reader.tensors if t.tensor_type == qtype)
    else:
        ref = next(t for t in reader.tensors if t.name == kind)
    with GGUFFile(default_gguf) as f:
        info = f.tensors[ref.name]
        assert info.qtype == int(ref.tensor_type)
        assert_bits_equal(f.tensor(ref.name), ref_dequantize(ref.data, ref.tensor_type))


def test_q4_k_blocks_rebuild_dequantize(make_blocks) -> None:
    """Q4_K in Q4_1's (d, m, q) shape, one scale and offset per 32: what the int4 kernels take as is."""
    shape = (3, 512)
    blocks = make_blocks(12, 3 * 2, seed=14)
    d, m, q = q4_k_blocks(blocks, shape)
    assert d.shape == m.shape == (3, 16)
    assert q.shape == shape and q.dtype == torch.uint8 and int(q.max()) <= 15
    w = d.repeat_interleave(32, dim=1) * q.float() + m.repeat_interleave(32, dim=1)
    assert_bits_equal(w, reference(blocks, 12, shape))
