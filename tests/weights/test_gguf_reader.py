"""GGUFFile against gguf-py (the reference) on files gguf-py writes, and on every way a file can be broken.

Files are written with `gguf.GGUFWriter` into tmp_path, then read back with both llmos and
`gguf.GGUFReader`; malformed files are valid ones with a few bytes patched, so each test breaks
exactly one thing and checks the refusal names it.
"""

from __future__ import annotations

import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import dequantize as ref_dequantize

from llmos.weights.dequant import GGML_TYPES
from llmos.weights.gguf import GGUFError, GGUFFile, GGUFTensorInfo

# name -> (qtype, PyTorch shape): every supported type, 1-D to 4-D.
TENSORS: dict[str, tuple[int, tuple[int, ...]]] = {
    "norm.f32": (0, (2, 1, 3, 4)),
    "emb.f16": (1, (3, 8)),
    "emb.bf16": (30, (16,)),
    "w.q4_0": (2, (4, 64)),
    "w.q4_1": (3, (2, 2, 96)),
    "w.q5_0": (6, (3, 32)),
    "w.q5_1": (7, (1, 128)),
    "w.q8_0": (8, (5, 64)),
    "w.q4_k": (12, (2, 256)),
    "w.q5_k": (13, (3, 512)),
    "w.q6_k": (14, (2, 256)),
}

TOKENS = [f"tok{i}" for i in range(20_000)] + ["", "héllo ✓", "Ġthe", "<|im_end|>"]

METADATA: dict[str, tuple[GGUFValueType, object]] = {
    "test.u8": (GGUFValueType.UINT8, 200),
    "test.i8": (GGUFValueType.INT8, -5),
    "test.u16": (GGUFValueType.UINT16, 60_000),
    "test.i16": (GGUFValueType.INT16, -30_000),
    "test.u32": (GGUFValueType.UINT32, 4_000_000_000),
    "test.i32": (GGUFValueType.INT32, -2_000_000_000),
    "test.u64": (GGUFValueType.UINT64, 2**63 + 5),
    "test.i64": (GGUFValueType.INT64, -(2**62)),
    "test.f32": (GGUFValueType.FLOAT32, 0.1),
    "test.f64": (GGUFValueType.FLOAT64, 0.1),
    "test.yes": (GGUFValueType.BOOL, True),
    "test.no": (GGUFValueType.BOOL, False),
    "test.str": (GGUFValueType.STRING, "héllo ✓ {{ template }}"),
}


def write_gguf(path: Path, make_blocks, alignment: int | None = None, tokens: list[str] = TOKENS) -> Path:
    """A GGUF v3 file with METADATA, `tokens`, assorted arrays and one tensor per TENSORS entry."""
    writer = GGUFWriter(path, "llama")
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    for key, (vtype, value) in METADATA.items():
        writer.add_key_value(key, value, vtype)
    writer.add_array("tokenizer.ggml.tokens", tokens)
    writer.add_key_value("test.floats", [0.5, -1.25, 3.0], GGUFValueType.ARRAY, sub_type=GGUFValueType.FLOAT32)
    writer.add_key_value("test.u64s", [0, 2**64 - 1], GGUFValueType.ARRAY, sub_type=GGUFValueType.UINT64)
    writer.add_key_value("test.bools", [True, False, True], GGUFValueType.ARRAY, sub_type=GGUFValueType.BOOL)
    writer.add_array("test.nested", [[1, 2], [3]])
    writer.add_array("test.raw_strings", ["ok", b"\xe2\x82"])  # a partial UTF-8 sequence, as some vocabs hold
    for i, (name, (qtype, shape)) in enumerate(TENSORS.items()):
        _, block, type_size = GGML_TYPES[qtype]
        blocks = make_blocks(qtype, int(np.prod(shape)) // block, seed=i)
        raw = blocks.reshape(*shape[:-1], shape[-1] // block * type_size)  # gguf-py's byte shape
        writer.add_tensor(name, raw, raw_dtype=GGMLQuantizationType(qtype))
    return finish(writer)


def finish(writer: GGUFWriter) -> Path:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert writer.path is not None
    return writer.path


@pytest.fixture
def gguf_path(tmp_path: Path, make_blocks) -> Path:
    return write_gguf(tmp_path / "model.gguf", make_blocks)


@pytest.fixture
def small_gguf_path(tmp_path: Path, make_blocks) -> Path:
    """The same file with a 3-token vocabulary: small enough to cut or corrupt at every byte."""
    return write_gguf(tmp_path / "small.gguf", make_blocks, tokens=["a", "é", ""])


# --- reading valid files ----------------------------------------------------------------------


def test_metadata_round_trips(gguf_path: Path) -> None:
    with GGUFFile(gguf_path) as f:
        meta = f.metadata
    assert f.version == 3
    assert meta["general.architecture"] == "llama"
    for key, (vtype, value) in METADATA.items():
        expected = float(np.float32(value)) if vtype == GGUFValueType.FLOAT32 else value
        assert meta[key] == expected and type(meta[key]) is type(expected), key
    assert meta["tokenizer.ggml.tokens"] == TOKENS
    assert meta["test.floats"] == [0.5, -1.25, 3.0]
    assert meta["test.u64s"] == [0, 2**64 - 1]
    assert meta["test.bools"] == [True, False, True]
    assert meta["test.nested"] == [[1, 2], [3]]
    ok, partial = meta["test.raw_strings"]
    assert ok == "ok" and partial.encode("utf-8", "surrogateescape") == b"\xe2\x82"


def test_metadata_matches_reference_reader(gguf_path: Path) -> None:
    reader = GGUFReader(gguf_path)
    with GGUFFile(gguf_path) as f:
        keys = [k for k in reader.fields if not k.startswith("GGUF.")]
        assert list(f.metadata) == keys
        for key in ("test.u64", "test.f64", "test.str", "tokenizer.ggml.tokens", "test.floats"):
            assert f.metadata[key] == reader.fields[key].contents(), key


def test_tensor_directory_matches_reference_reader(gguf_path: Path) -> None:
    reader = GGUFReader(gguf_path)
    with GGUFFile(gguf_path) as f:
        assert list(f.tensors) == [t.name for t in reader.tensors] == list(TENSORS)
        for ref in reader.tensors:
            info = f.tensors[ref.name]
            assert isinstance(info, GGUFTensorInfo)
            assert info.shape == tuple(reversed(ref.shape.tolist())) == TENSORS[ref.name][1]
            assert info.qtype == int(ref.tensor_type) == TENSORS[ref.name][0]
            assert (info.offset, info.nbytes) == (ref.data_offset, ref.n_bytes)
            assert info.offset % 32 == 0


def test_tensors_match_reference_bit_for_bit(gguf_path: Path) -> None:
    reader = GGUFReader(gguf_path)
    with GGUFFile(gguf_path) as f:
        for ref in reader.tensors:
            expected = np.ascontiguousarray(ref_dequantize(ref.data, ref.tensor_type), dtype=np.float32)
            got = f.tensor(ref.name)
            assert got.dtype == torch.float32 and tuple(got.shape) == expected.shape, ref.name
            assert np.array_equal(got.numpy().view(np.uint32), expected.view(np.uint32)), ref.name
            assert np.array_equal(f.raw(ref.name), ref.data.view(np.uint8).reshape(-1)), ref.name


def test_custom_alignment_is_honoured(tmp_path: Path, make_blocks) -> None:
    path = write_gguf(tmp_path / "a64.gguf", make_blocks, alignment=64)
    reader = GGUFReader(path)
    with GGUFFile(path) as f:
        assert f.metadata["general.alignment"] == 64
        for ref in reader.tensors:
            assert f.tensors[ref.name].offset == ref.data_offset and ref.data_offset % 64 == 0
            assert np.array_equal(f.raw(ref.name), ref.data.view(np.uint8).reshape(-1))


def test_version_2_reads_like_version_3(gguf_path: Path) -> None:
    with GGUFFile(gguf_path) as f3:
        expected = {name: f3.tensor(name).clone() for name in f3.tensors}
    patch(gguf_path, 4, struct.pack("<I", 2))
    with GGUFFile(gguf_path) as f2:
        assert f2.version == 2
        for name, t in expected.items():
            assert torch.equal(f2.tensor(name), t)


def test_raw_is_a_view_into_the_map(gguf_path: Path) -> None:
    with GGUFFile(gguf_path) as f:
        raw = f.raw("w.q4_k")
        assert raw.dtype == np.uint8 and raw.shape == (f.tensors["w.q4_k"].nbytes,)
        assert not raw.flags.owndata


def test_writes_to_returned_tensors_never_reach_the_file(gguf_path: Path) -> None:
    before = gguf_path.read_bytes()
    with GGUFFile(gguf_path) as f:
        original = f.tensor("norm.f32").clone()
        f.tensor("norm.f32").add_(1.0)  # a view into the copy-on-write map
        f.raw("w.q8_0")[:] = 0
    assert gguf_path.read_bytes() == before
    with GGUFFile(gguf_path) as f:
        assert torch.equal(f.tensor("norm.f32"), original)


def test_views_outlive_close_and_reads_after_close_are_refused(gguf_path: Path) -> None:
    f = GGUFFile(gguf_path)
    kept = f.tensor("norm.f32")
    expected = kept.clone()
    f.close()
    f.close()  # idempotent
    assert torch.equal(kept, expected)
    with pytest.raises(GGUFError, match="closed"):
        f.tensor("norm.f32")


def test_unknown_tensor_name_is_refused(gguf_path: Path) -> None:
    with GGUFFile(gguf_path) as f, pytest.raises(GGUFError, match="no tensor 'missing.weight'"):
        f.tensor("missing.weight")


# --- malformed files --------------------------------------------------------------------------


def patch(path: Path, offset: int, new: bytes) -> None:
    data = bytearray(path.read_bytes())
    data[offset : offset + len(new)] = new
    path.write_bytes(bytes(data))


def string_end(data: bytes, text: str) -> int:
    """Offset just past the GGUF string `text` (u64 length + bytes) in `data`."""
    encoded = text.encode()
    start = data.index(struct.pack("<Q", len(encoded)) + encoded)
    return start + 8 + len(encoded)


def tensor_fields(path: Path, name: str) -> dict[str, int]:
    """Byte offsets of the directory fields of tensor `name`."""
    data = path.read_bytes()
    at = string_end(data, name)
    n_dims = struct.unpack_from("<I", data, at)[0]
    return {"n_dims": at, "dim0": at + 4, "type": at + 4 + 8 * n_dims, "offset": at + 8 + 8 * n_dims}


def refused(path: Path, match: str) -> GGUFError:
    with pytest.raises(GGUFError, match=match) as info:
        GGUFFile(path)
    assert str(path) in str(info.value)  # every refusal names the file
    return info.value


def test_truncation_anywhere_before_the_data_is_refused(small_gguf_path: Path, tmp_path: Path) -> None:
    data = small_gguf_path.read_bytes()
    with GGUFFile(small_gguf_path) as f:
        data_start = min(t.offset for t in f.tensors.values())
    cut_path = tmp_path / "cut.gguf"
    for cut in range(data_start + 1):  # every cut of header, metadata, directory and padding
        cut_path.write_bytes(data[:cut])
        with pytest.raises(GGUFError):
            GGUFFile(cut_path)


@pytest.mark.parametrize(
    ("where", "match"),
    [
        ("mid-header", "shorter than the 24-byte GGUF header"),
        ("mid-metadata", r"string 19990 of array 'tokenizer.ggml.tokens'.*file ends at byte \d+; it is truncated"),
        ("mid-directory", r"file ends at byte \d+; it is truncated"),
        ("mid-tensor-data", r"runs past the end of the file"),
    ],
)
def test_truncation_messages(gguf_path: Path, where: str, match: str) -> None:
    data = gguf_path.read_bytes()
    with GGUFFile(gguf_path) as f:
        last = list(f.tensors.values())[-1]
    cut = {
        "mid-header": 13,
        "mid-metadata": string_end(data, "tok19990") - 2,
        "mid-directory": tensor_fields(gguf_path, "w.q5_0")["dim0"] + 3,
        "mid-tensor-data": last.offset + last.nbytes // 2,
    }[where]
    gguf_path.write_bytes(data[:cut])
    refused(gguf_path, match)


@pytest.mark.parametrize(
    ("head", "match"),
    [
        (b"GGUX" + bytes(40), r"not a GGUF file \(it starts with b'GGUX'"),
        (b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}" + bytes(20), "not a GGUF file.*pickle"),
        (b"PK\x03\x04\x00\x00\x08\x00" + bytes(40), "not a GGUF file.*zip"),
        (struct.pack("<Q", 40) + b'{"__metadata__": {}}' + bytes(20), "not a GGUF file.*safetensors"),
        (b"tjgg\x03\x00\x00\x00" + bytes(40), "not a GGUF file.*legacy GGML"),
        (b"version https://git-lfs.github.com/spec/v1\n", "not a GGUF file.*Git LFS"),
        (b"<!DOCTYPE html><html>", "not a GGUF file.*HTML"),
        (b"", "not a GGUF file: it is only 0 bytes"),
        (b"GG", "not a GGUF file: it is only 2 bytes"),
    ],
    ids=["bad-magic", "pickle", "zip", "safetensors", "ggjt", "lfs", "html", "empty", "tiny"],
)
def test_not_gguf_is_refused_with_a_hint(tmp_path: Path, head: bytes, match: str) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(head)
    refused(path, match)


@pytest.mark.parametrize(
    ("version", "match"),
    [
        (struct.pack("<I", 1), "GGUF version 1, a 2023 pre-release format"),
        (struct.pack("<I", 99), "GGUF version 99; llmos reads versions 2 and 3"),
        (struct.pack("<I", 0), "GGUF version 0"),
        (struct.pack(">I", 3), "big-endian GGUF v3"),
    ],
    ids=["v1", "v99", "v0", "big-endian"],
)
def test_unsupported_versions_are_refused(gguf_path: Path, version: bytes, match: str) -> None:
    patch(gguf_path, 4, version)
    refused(gguf_path, match)


@pytest.mark.parametrize("field", ["tensor_count", "kv_count"])
def test_absurd_counts_are_refused_without_allocating(gguf_path: Path, field: str) -> None:
    patch(gguf_path, 8 if field == "tensor_count" else 16, struct.pack("<Q", 2**62))
    tracemalloc.start()
    try:
        error = refused(gguf_path, "cannot fit in the")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "4611686018427387904" in str(error)
    assert peak < 16 * 2**20


@pytest.mark.parametrize(
    ("target", "match"),
    [
        ("first key", "the key of metadata entry 0 .*file ends at byte"),
        ("string value", "the string value of 'test.str'.*file ends at byte"),
        ("token string", "string 0 of array 'tokenizer.ggml.tokens'.*file ends at byte"),
        ("tensor name", "the name of tensor 0 .*file ends at byte"),
    ],
)
def test_string_lengths_past_the_end_are_refused(gguf_path: Path, target: str, match: str) -> None:
    data = gguf_path.read_bytes()
    at = {
        "first key": 24,
        "string value": string_end(data, "test.str") + 4,  # after the key and its value type
        "token string": string_end(data, "tokenizer.ggml.tokens") + 4 + 4 + 8,  # type, item type, count
        "tensor name": data.index(struct.pack("<Q", len("norm.f32")) + b"norm.f32"),
    }[target]
    patch(gguf_path, at, struct.pack("<Q", 2**40))
    tracemalloc.start()
    try:
        refused(gguf_path, match)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20


def test_array_count_past_the_end_is_refused(gguf_path: Path) -> None:
    count_at = string_end(gguf_path.read_bytes(), "tokenizer.ggml.tokens") + 4 + 4
    patch(gguf_path, count_at, struct.pack("<Q", 2**60))
    refused(gguf_path, r"the lengths of 1152921504606846976 strings in array 'tokenizer.ggml.tokens'")


def test_unknown_metadata_value_type_is_refused(gguf_path: Path) -> None:
    patch(gguf_path, string_end(gguf_path.read_bytes(), "test.u8"), struct.pack("<I", 13))
    refused(gguf_path, "metadata key 'test.u8' has unknown value type 13")


def test_unknown_array_element_type_is_refused(gguf_path: Path) -> None:
    patch(gguf_path, string_end(gguf_path.read_bytes(), "test.floats") + 4, struct.pack("<I", 77))
    refused(gguf_path, "metadata array 'test.floats' has unknown element type 77")


def test_invalid_utf8_key_is_refused(gguf_path: Path) -> None:
    patch(gguf_path, string_end(gguf_path.read_bytes(), "test.u8") - 2, b"\xff")
    refused(gguf_path, "the key of metadata entry .* is not valid UTF-8")


def test_duplicate_key_is_refused(gguf_path: Path) -> None:
    patch(gguf_path, string_end(gguf_path.read_bytes(), "test.i8") - 7, b"test.u8")
    refused(gguf_path, "metadata key 'test.u8' appears twice")


def test_duplicate_tensor_name_is_refused(gguf_path: Path) -> None:
    patch(gguf_path, string_end(gguf_path.read_bytes(), "w.q4_1") - 6, b"w.q4_0")
    refused(gguf_path, "tensor 'w.q4_0' appears twice")


@pytest.mark.parametrize("value", [48, 0])
def test_bad_alignment_is_refused(tmp_path: Path, value: int) -> None:
    writer = GGUFWriter(tmp_path / "m.gguf", "llama")
    writer.add_uint32("general.alignment", value)  # bypasses add_custom_alignment's own check
    writer.add_tensor("x", np.zeros(4, np.float32))
    path = finish(writer)
    refused(path, f"general.alignment is {value}; it must be a positive power of two")


@pytest.mark.parametrize(
    ("qtype", "match"),
    [
        (16, r"'w.q8_0' is stored as IQ2_XXS \(GGML type 16\).*supported types: F32, F16, Q4_0"),
        (39, r"'w.q8_0' is stored as MXFP4 \(GGML type 39\)"),
        (9, r"'w.q8_0' is stored as Q8_1 \(GGML type 9\)"),
        (1000, r"'w.q8_0' is stored as unknown type 1000 \(GGML type 1000\)"),
    ],
)
def test_unsupported_tensor_type_is_refused(gguf_path: Path, qtype: int, match: str) -> None:
    patch(gguf_path, tensor_fields(gguf_path, "w.q8_0")["type"], struct.pack("<I", qtype))
    refused(gguf_path, match)


@pytest.mark.parametrize("n_dims", [0, 5, 2**31])
def test_bad_dimension_count_is_refused(gguf_path: Path, n_dims: int) -> None:
    patch(gguf_path, tensor_fields(gguf_path, "w.q4_0")["n_dims"], struct.pack("<I", n_dims))
    refused(gguf_path, f"tensor 'w.q4_0' has {n_dims} dimensions; GGUF tensors have 1 to 4")


@pytest.mark.parametrize("dim", [0, 2**63, 2**64 - 1])
def test_bad_dimension_is_refused(gguf_path: Path, dim: int) -> None:
    patch(gguf_path, tensor_fields(gguf_path, "w.q4_0")["dim0"], struct.pack("<Q", dim))
    refused(gguf_path, r"tensor 'w.q4_0' has invalid dimensions")


def test_row_not_a_multiple_of_the_block_is_refused(gguf_path: Path) -> None:
    patch(gguf_path, tensor_fields(gguf_path, "w.q8_0")["dim0"], struct.pack("<Q", 48))
    refused(gguf_path, r"'w.q8_0' \(Q8_0, shape \(5, 48\)\) has rows of 48 elements, not a multiple of the 32")


def test_huge_dims_are_refused_as_past_the_end(gguf_path: Path) -> None:
    fields = tensor_fields(gguf_path, "w.q4_0")
    patch(gguf_path, fields["dim0"] + 8, struct.pack("<Q", 2**40))  # rows: 2**40 x 64 Q4_0
    refused(gguf_path, r"tensor 'w.q4_0' data \[\d+, \d+\) runs past the end of the file")


def test_tensor_offset_past_the_end_is_refused(gguf_path: Path) -> None:
    size = gguf_path.stat().st_size
    patch(gguf_path, tensor_fields(gguf_path, "w.q6_k")["offset"], struct.pack("<Q", size * 32))
    refused(gguf_path, r"tensor 'w.q6_k' data \[\d+, \d+\) runs past the end of the file")


def test_misaligned_tensor_offset_is_refused(gguf_path: Path) -> None:
    at = tensor_fields(gguf_path, "w.q6_k")["offset"]
    rel = struct.unpack_from("<Q", gguf_path.read_bytes(), at)[0]
    patch(gguf_path, at, struct.pack("<Q", rel + 4))
    refused(gguf_path, rf"tensor 'w.q6_k' data offset {rel + 4} is not a multiple of the alignment 32")


def test_deeply_nested_arrays_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "nested.gguf"
    value: list = [1]
    for _ in range(12):
        value = [value]
    writer = GGUFWriter(path, "llama")
    writer.add_array("test.deep", value)
    refused(finish(writer), "'test.deep' nests arrays more than 8 deep")


def test_missing_file_and_folder_are_refused(tmp_path: Path) -> None:
    refused(tmp_path / "absent.gguf", "no such file")
    refused(tmp_path, "is a folder, not a GGUF file")


def test_random_header_corruption_is_refused_or_readable(small_gguf_path: Path, tmp_path: Path) -> None:
    # Whatever a flipped byte does to the header, the reader either refuses it with GGUFError or
    # returns a file whose every tensor dequantizes: never another exception, never a huge allocation.
    data = small_gguf_path.read_bytes()
    with GGUFFile(small_gguf_path) as f:
        data_start = min(t.offset for t in f.tensors.values())
    rng = np.random.default_rng(0)
    broken = tmp_path / "broken.gguf"
    outcomes = {"refused": 0, "read": 0}
    for _ in range(300):
        mutated = bytearray(data)
        at = int(rng.integers(0, data_start))
        mutated[at] = int(rng.integers(0, 256))
        broken.write_bytes(bytes(mutated))
        try:
            g = GGUFFile(broken)
        except GGUFError:
            outcomes["refused"] += 1
            continue
        with g:
            for name in g.tensors:
                g.tensor(name)
        outcomes["read"] += 1
    assert outcomes["refused"] > 0 and outcomes["read"] > 0


@pytest.mark.slow
def test_default_model_directory_and_metadata_match_reference(default_gguf: Path) -> None:
    reader = GGUFReader(default_gguf)
    with GGUFFile(default_gguf) as f:
        assert list(f.tensors) == [t.name for t in reader.tensors]
        for ref in reader.tensors:
            info = f.tensors[ref.name]
            assert info.shape == tuple(reversed(ref.shape.tolist()))
            assert (info.qtype, info.offset, info.nbytes) == (int(ref.tensor_type), ref.data_offset, ref.n_bytes)
        assert list(f.metadata) == [k for k in reader.fields if not k.startswith("GGUF.")]
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                    "llama.rope.freq_base", "tokenizer.chat_template"):
            assert f.metadata[key] == reader.fields[key].contents(), key


def test_a_settled_files_header_is_parsed_once_and_a_rewritten_one_again(gguf_path: Path, monkeypatch) -> None:
    """A model's loading opens its file several times; a 262k vocabulary costs ~0.23 s a parse."""
    import os

    from llmos.weights import gguf

    parses = []
    real = gguf._Parser.__init__

    def counting(self, *args, **kwargs):
        parses.append(1)
        real(self, *args, **kwargs)

    monkeypatch.setattr(gguf._Parser, "__init__", counting)
    monkeypatch.setattr(gguf, "_HEADERS", {})
    with GGUFFile(gguf_path) as f:  # just written: not kept (a rewrite could share its mtime)
        tokens = f.metadata["tokenizer.ggml.tokens"]
    GGUFFile(gguf_path).close()
    assert len(parses) == 2
    settled = gguf_path.stat().st_mtime_ns - 5 * 10**9
    os.utime(gguf_path, ns=(settled, settled))
    with GGUFFile(gguf_path) as a, GGUFFile(gguf_path) as b:
        assert a.metadata["tokenizer.ggml.tokens"] == tokens and b.tensors == a.tensors
        a.metadata["general.name"] = "changed"  # each file's dicts are its own
        assert b.metadata.get("general.name") != "changed"
    assert len(parses) == 3
    data = gguf_path.read_bytes()
    patch(gguf_path, string_end(data, "tok19999") - 1, b"X")  # rewritten in place, same size: parsed again
    with GGUFFile(gguf_path) as f:
        assert f.metadata["tokenizer.ggml.tokens"][19_999] == "tok1999X"
    assert len(parses) == 4
