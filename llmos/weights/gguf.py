"""Read GGUF v2/v3 files: metadata, tensor directory, and tensors, from a memory map.

Contract: `GGUFFile(path)` parses and validates the whole header before handing anything out, and
refuses a file it cannot read with a `GGUFError` naming the file, the problem, and what to do. Every
count and length read from the file is checked against the bytes that remain before anything is
allocated for it, so a corrupt or hostile header fails fast instead of exhausting memory. Tensor
bytes are never read at open: `raw(name)` is a zero-copy uint8 view into the map and `tensor(name)`
dequantizes that view to float32 (F32 tensors come back as views, also zero-copy).

The map is copy-on-write: writing into a returned view changes this process's pages, never the file.
Only little-endian GGUF is read (what llama.cpp writes on every common platform).

File layout (all little-endian):
  magic "GGUF" | version u32 | tensor_count u64 | kv_count u64
  kv_count x (key: string, value_type u32, value)      string = u64 length + UTF-8 bytes
  tensor_count x (name: string, n_dims u32, dims u64 x n_dims (innermost first), type u32, offset u64)
  padding to `general.alignment` (default 32), then tensor data; offsets are relative to its start.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch

from llmos.errors import LlmosError
from llmos.weights.dequant import GGML_TYPES, dequantize, supported_type_names, type_name


class GGUFError(LlmosError):
    """A GGUF file llmos refuses to read: the message names the file, the problem and the remedy."""


@dataclass(frozen=True)
class GGUFTensorInfo:
    """Where one tensor lives in the file and how it is encoded."""

    name: str
    shape: tuple[int, ...]  # PyTorch order (rows, cols): the GGML dims reversed
    qtype: int  # GGML type id, a key of dequant.GGML_TYPES
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


_HEADER_SIZE = 24  # magic, version, tensor_count, kv_count
_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_ARRAY_NESTING = 8  # arrays of arrays are legal; deeper nesting is only ever corruption

# Smallest possible encodings, used to refuse counts that cannot fit in the file before looping.
_MIN_KV_BYTES = 8 + 4 + 1  # empty key, value type, a one-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # empty name, n_dims, one dim, type, offset

_STRING, _ARRAY = 8, 9
# GGUF value type -> (name, struct, dtype) for fixed-size scalars; all little-endian.
_SCALARS: dict[int, tuple[str, struct.Struct, np.dtype]] = {
    vtype: (name, struct.Struct(fmt), np.dtype(fmt.replace("?", "B")))
    for vtype, name, fmt in [
        (0, "uint8", "<B"),
        (1, "int8", "<b"),
        (2, "uint16", "<H"),
        (3, "int16", "<h"),
        (4, "uint32", "<I"),
        (5, "int32", "<i"),
        (6, "float32", "<f"),
        (7, "bool", "<?"),  # any non-zero byte is True, as in llama.cpp; arrays compare with 0
        (10, "uint64", "<Q"),
        (11, "int64", "<q"),
        (12, "float64", "<d"),
    ]
}
_BOOL = 7
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


# Parsed headers by (path, size, mtime, inode): a model's loading opens its file several times (its
# config, its tokenizer, its weights, the translator's languages), and a 262k-piece vocabulary takes
# ~0.23 s to parse each time. Only files last written over a second before are kept: a file rewritten
# in place later gets a later mtime (clocks tick in milliseconds, not seconds), so it is parsed again.
_HEADERS: dict[tuple[str, int, int, int], tuple[int, dict[str, Any], dict[str, GGUFTensorInfo]]] = {}
_HEADERS_KEPT = 4
_SETTLED_NS = 1_000_000_000


class GGUFFile:
    """A GGUF file opened for reading.

    Attributes: `path`; `version` (2 or 3); `metadata`, key -> int/float/bool/str or (nested) list,
    in file order; `tensors`, name -> GGUFTensorInfo, in file order.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._mm: mmap.mmap | None = None
        try:
            with open(self.path, "rb") as f:
                stat = os.fstat(f.fileno())  # of the file mapped below, whatever the path names later
                size = stat.st_size
                head = f.read(_HEADER_SIZE)
                _check_preamble(self.path, head, size)
                # The map outlives the file object: mmap holds its own descriptor.
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except FileNotFoundError:
            raise GGUFError(f"{self.path}: no such file; check the path or download the model first") from None
        except IsADirectoryError:
            raise GGUFError(f"{self.path} is a folder, not a GGUF file; pass the .gguf file inside it") from None
        except OSError as e:
            problem = e.strerror or str(e)
            raise GGUFError(f"{self.path}: cannot read it ({problem}); check the path and permissions") from None
        key = (str(self.path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)
        header = _HEADERS.get(key)
        if header is None:
            try:
                parser = _Parser(self._mm, size, self.path)
            except GGUFError:
                self.close()
                raise
            header = (parser.version, parser.metadata, parser.tensors)
            if time.time_ns() - stat.st_mtime_ns > _SETTLED_NS:
                _HEADERS[key] = header
                while len(_HEADERS) > _HEADERS_KEPT:
                    del _HEADERS[next(iter(_HEADERS))]
        version, metadata, tensors = header
        self.version: int = version
        # Copies of the dicts (their values are shared: nothing in llmos changes them).
        self.metadata: dict[str, Any] = dict(metadata)
        self.tensors: dict[str, GGUFTensorInfo] = dict(tensors)

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes of tensor `name` as a uint8 view into the map (no copy)."""
        return self._raw(self._info(name))

    def tensor(self, name: str) -> torch.Tensor:
        """Tensor `name` dequantized to float32, in `info.shape` (PyTorch order)."""
        info = self._info(name)
        return dequantize(self._raw(info), info.qtype, info.shape)

    def close(self) -> None:
        """Release the map. Views handed out earlier keep their pages mapped until they are freed."""
        mm, self._mm = self._mm, None
        if mm is None:
            return
        try:
            mm.close()
        except BufferError:
            # numpy/torch views still export the buffer; the OS unmaps when the last one is freed.
            pass

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GGUFFile({str(self.path)!r}, version={self.version}, tensors={len(self.tensors)})"

    def _raw(self, info: GGUFTensorInfo) -> np.ndarray:
        assert self._mm is not None  # _info refuses a closed file
        return np.frombuffer(self._mm, dtype=np.uint8, count=info.nbytes, offset=info.offset)

    def _info(self, name: str) -> GGUFTensorInfo:
        if self._mm is None:
            raise GGUFError(f"{self.path} was closed; open it again to read tensor {name!r}")
        info = self.tensors.get(name)
        if info is None:
            raise GGUFError(
                f"{self.path} has no tensor {name!r} (it has {len(self.tensors)} tensors); "
                "the file may be for a different architecture"
            )
        return info


def _check_preamble(path: Path, head: bytes, size: int) -> None:
    """Refuse, from the first bytes alone, anything that is not a little-endian GGUF v2/v3 file."""
    if size < 4:
        raise GGUFError(f"{path} is not a GGUF file: it is only {size} bytes long; download it again")
    if head[:4] != b"GGUF":
        raise GGUFError(f"{path} is not a GGUF file (it starts with {head[:4]!r}, not b'GGUF'){_guess_format(head)}")
    if size < _HEADER_SIZE:
        raise GGUFError(
            f"{path} is truncated: {size} bytes is shorter than the {_HEADER_SIZE}-byte GGUF header; download it again"
        )
    version = _U32.unpack_from(head, 4)[0]
    if version in _VERSIONS:
        return
    swapped = int.from_bytes(head[4:8], "big")
    if swapped in _VERSIONS:
        raise GGUFError(
            f"{path} is a big-endian GGUF v{swapped} file; llmos reads little-endian GGUF only. "
            "Convert it with gguf-py's gguf_convert_endian.py (target: little)"
        )
    if version == 1:
        raise GGUFError(
            f"{path} is GGUF version 1, a 2023 pre-release format llmos does not read; "
            "re-convert the model with a current llama.cpp convert script (GGUF v3)"
        )
    raise GGUFError(
        f"{path} has GGUF version {version}; llmos reads versions 2 and 3. "
        "Re-convert the model with llama.cpp, or upgrade llmos if the file is from a newer format"
    )


def _guess_format(head: bytes) -> str:
    """A hint at what a non-GGUF file actually is, so the user knows which loader they need."""
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "; it looks like a Python pickle (a PyTorch .bin/.pt checkpoint), which llmos refuses to unpickle"
    if head[:4] == b"PK\x03\x04":
        return "; it looks like a zip archive, e.g. a PyTorch .pt/.bin checkpoint, which llmos refuses to unpickle"
    if len(head) >= 9 and head[8:9] == b"{":
        return "; it looks like a safetensors file: load the Hugging Face folder that holds it instead"
    if head[:4] in (b"lmgg", b"fmgg", b"tjgg"):
        return "; it is a legacy GGML/GGMF/GGJT model from before GGUF: re-convert it with llama.cpp"
    if head[:7] == b"version":
        return "; it looks like a Git LFS pointer, not the model: fetch the real file (git lfs pull)"
    if head.lstrip()[:1] == b"<":
        return "; it looks like an HTML page, probably an error page saved by a failed download"
    return ""


class _Parser:
    """One pass over the header: every read is bounds-checked against the file size."""

    def __init__(self, buf: mmap.mmap, size: int, path: Path) -> None:
        self.buf = buf
        self.size = size
        self.path = path
        self.pos = 4
        self.version = self._u32("the version")
        tensor_count = self._u64("the tensor count")
        kv_count = self._u64("the metadata count")
        room = size - self.pos
        if tensor_count * _MIN_TENSOR_INFO_BYTES + kv_count * _MIN_KV_BYTES > room:
            raise self._error(
                f"the header claims {tensor_count} tensors and {kv_count} metadata entries, "
                f"which cannot fit in the {room} bytes that follow it; the file is truncated or corrupt"
            )
        self.metadata: dict[str, Any] = {}
        for i in range(kv_count):
            key = self._string(f"the key of metadata entry {i}", strict=True)
            vtype = self._u32(f"the value type of metadata key {key!r}")
            if key in self.metadata:
                raise self._error(f"metadata key {key!r} appears twice; the file is corrupt")
            self.metadata[key] = self._value(vtype, key, 0)
        infos = [self._tensor_info(i) for i in range(tensor_count)]
        alignment = self._alignment()
        data_start = -(-self.pos // alignment) * alignment
        self.tensors: dict[str, GGUFTensorInfo] = {}
        for name, shape, qtype, rel in infos:
            if name in self.tensors:
                raise self._error(f"tensor {name!r} appears twice; the file is corrupt")
            self.tensors[name] = self._place(name, shape, qtype, rel, data_start, alignment)

    # --- primitives ---

    def _error(self, problem: str) -> GGUFError:
        return GGUFError(f"{self.path}: {problem}")

    def _need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self._error(
                f"needs {n} bytes for {what} at byte {self.pos}, but the file ends at byte {self.size}; "
                "it is truncated or corrupt, download it again"
            )

    def _u32(self, what: str) -> int:
        self._need(4, what)
        value = _U32.unpack_from(self.buf, self.pos)[0]
        self.pos += 4
        return value

    def _u64(self, what: str) -> int:
        self._need(8, what)
        value = _U64.unpack_from(self.buf, self.pos)[0]
        self.pos += 8
        return value

    def _string(self, what: str, strict: bool = False) -> str:
        n = self._u64(f"the length of {what}")
        self._need(n, f"{what} ({n} bytes)")
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        return self._decode(raw, what, strict)

    def _decode(self, raw: bytes, what: str, strict: bool) -> str:
        if not strict:
            # Token strings may hold partial UTF-8 sequences; surrogateescape keeps their exact bytes
            # (recover them with .encode("utf-8", "surrogateescape")).
            return raw.decode("utf-8", "surrogateescape")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self._error(f"{what} is not valid UTF-8 ({raw[:40]!r}); the file is corrupt") from None

    # --- metadata values ---

    def _value(self, vtype: int, key: str, depth: int) -> Any:
        if vtype in _SCALARS:
            name, st, _ = _SCALARS[vtype]
            self._need(st.size, f"the {name} value of {key!r}")
            value = st.unpack_from(self.buf, self.pos)[0]
            self.pos += st.size
            return value
        if vtype == _STRING:
            return self._string(f"the string value of {key!r}")
        if vtype == _ARRAY:
            return self._array(key, depth)
        raise self._error(
            f"metadata key {key!r} has unknown value type {vtype} (GGUF defines 0-12); "
            "the file is corrupt or from a newer GGUF revision"
        )

    def _array(self, key: str, depth: int) -> list[Any]:
        if depth >= _MAX_ARRAY_NESTING:
            raise self._error(
                f"metadata key {key!r} nests arrays more than {_MAX_ARRAY_NESTING} deep; the file is corrupt"
            )
        itype = self._u32(f"the element type of array {key!r}")
        count = self._u64(f"the length of array {key!r}")
        if itype in _SCALARS:
            name, _, dt = _SCALARS[itype]
            self._need(count * dt.itemsize, f"{count} {name} elements of array {key!r}")
            arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos)
            self.pos += count * dt.itemsize
            return (arr != 0).tolist() if itype == _BOOL else arr.tolist()
        if itype == _STRING:
            self._need(count * 8, f"the lengths of {count} strings in array {key!r}")
            return self._string_array(key, count)
        if itype == _ARRAY:
            self._need(count * 12, f"{count} nested arrays in {key!r}")
            return [self._array(key, depth + 1) for _ in range(count)]
        raise self._error(
            f"metadata array {key!r} has unknown element type {itype} (GGUF defines 0-12); "
            "the file is corrupt or from a newer GGUF revision"
        )

    def _string_array(self, key: str, count: int) -> list[str]:
        # Vocabularies hold 50k-250k strings: a tight loop with locals, no per-item method calls, and
        # one bounds check per string (unpack_from itself refuses a length past the end of the map).
        buf, size, pos = self.buf, self.size, self.pos
        unpack = _U64.unpack_from
        out: list[str] = []
        append = out.append
        for i in range(count):
            try:
                n = unpack(buf, pos)[0]
            except struct.error:
                self.pos = pos
                self._need(8, f"the length of string {i} of array {key!r}")
                raise
            pos += 8 + n
            if pos > size:
                self.pos = pos - n
                self._need(n, f"string {i} of array {key!r} ({n} bytes)")
            append(buf[pos - n : pos].decode("utf-8", "surrogateescape"))
        self.pos = pos
        return out

    # --- tensor directory ---

    def _tensor_info(self, i: int) -> tuple[str, tuple[int, ...], int, int]:
        name = self._string(f"the name of tensor {i}", strict=True)
        n_dims = self._u32(f"the dimension count of tensor {name!r}")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise self._error(
                f"tensor {name!r} has {n_dims} dimensions; GGUF tensors have 1 to {_MAX_DIMS}. The file is corrupt"
            )
        dims = [self._u64(f"dimension {j} of tensor {name!r}") for j in range(n_dims)]
        if any(d == 0 or d >= 2**63 for d in dims):
            raise self._error(
                f"tensor {name!r} has invalid dimensions {dims} (each must be positive); the file is corrupt"
            )
        qtype = self._u32(f"the type of tensor {name!r}")
        if qtype not in GGML_TYPES:
            raise self._error(
                f"tensor {name!r} is stored as {type_name(qtype)} (GGML type {qtype}), which llmos cannot "
                f"dequantize; supported types: {supported_type_names()}. Use a file quantized to one of those"
            )
        rel = self._u64(f"the data offset of tensor {name!r}")
        return name, tuple(reversed(dims)), qtype, rel

    def _alignment(self) -> int:
        alignment = self.metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
        if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
            raise self._error(
                f"general.alignment is {alignment!r}; it must be a positive power of two. The file is corrupt"
            )
        return alignment

    def _place(
        self, name: str, shape: tuple[int, ...], qtype: int, rel: int, data_start: int, alignment: int
    ) -> GGUFTensorInfo:
        qname, block, type_size = GGML_TYPES[qtype]
        count = math.prod(shape)
        if shape[-1] % block:
            raise self._error(
                f"tensor {name!r} ({qname}, shape {shape}) has rows of {shape[-1]} elements, not a multiple of "
                f"the {block}-element {qname} block, so it cannot be split into blocks; the file is corrupt"
            )
        nbytes = count // block * type_size
        if rel % alignment:
            raise self._error(
                f"tensor {name!r} data offset {rel} is not a multiple of the alignment {alignment}; the file is corrupt"
            )
        offset = data_start + rel
        if offset + nbytes > self.size:
            raise self._error(
                f"tensor {name!r} data [{offset}, {offset + nbytes}) runs past the end of the file "
                f"({self.size} bytes); it is truncated or corrupt, download it again"
            )
        return GGUFTensorInfo(name=name, shape=shape, qtype=qtype, offset=offset, nbytes=nbytes)
