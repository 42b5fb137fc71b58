"""A cache of models already converted to a fast weight form, so loading skips the conversion.

Converting a GGUF model to int4/int8 kernels' layouts (unpacking Q4_1 blocks, packing int4, requantizing
the head) costs about a second; reading the converted tensors back from a safetensors file in the page
cache costs a tenth of that. `save` writes a model's state (packed buffers included) with a small JSON
header naming each converted Linear's class; `load` rebuilds the model on the meta device, puts
empty modules of those classes in place and assigns the tensors. Files are written atomically
(temporary name, fsync, rename), so a crash never leaves a half-written cache entry.
"""

from __future__ import annotations

import json
import mmap
import os
from pathlib import Path

import torch
from torch import nn

from llmos import quant
from llmos.config import ModelConfig
from llmos.files import commit, temp_for
from llmos.models import set_module
from llmos.weights.load import build_model

FORMAT = "llmos-converted-1"


def save(model: nn.Module, path: Path) -> None:
    modules = {name: type(m).__name__ for name, m in model.named_modules() if type(m).__name__ in quant.KINDS}
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if type(model.embed).__name__ == "HeadEmbedding":
        modules["embed"] = "HeadEmbedding"  # no tensors of its own: rebuilt over the head on load
    elif getattr(model.output, "weight", None) is model.embed.weight:
        state.pop("output.weight", None)  # shared with the embedding: stored once
    meta = {"format": FORMAT, "modules": json.dumps(modules)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_for(path)
    with open(tmp, "wb") as f:
        _write_aligned(f, state, meta)
    commit(tmp, path)


def _write_aligned(f, state: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """A safetensors file whose tensors start on 64-byte boundaries, so they can be used straight
    from the memory map: the header is padded with spaces (as the format allows) and tensors whose
    sizes are multiples of 64 bytes come first (the format allows no gaps between tensors)."""
    names = sorted(state, key=lambda k: (state[k].numel() * state[k].element_size()) % 64 != 0)
    header: dict[str, object] = {"__metadata__": meta}
    offset = 0
    for name in names:
        t = state[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 64)
    f.write(len(raw).to_bytes(8, "little"))
    f.write(raw)
    for name in names:
        f.write(state[name].view(-1).view(torch.uint8).numpy())  # contiguous already (save)


_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I8": torch.int8, "U8": torch.uint8,
           "I32": torch.int32, "I64": torch.int64}


_NAMES = {v: k for k, v in _DTYPES.items()}


def _mapped_tensors(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]] | None:
    """(metadata, tensors) of a safetensors file, the tensors viewing a private memory map: no copy
    is made, pages are read on first touch and shared with the page cache."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                return None
            header = json.loads(f.read(n))
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except (OSError, ValueError):
        return None
    meta = header.pop("__metadata__", {}) or {}
    tensors = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        dtype = _DTYPES[info["dtype"]]
        count = (end - start) // torch.empty((), dtype=dtype).element_size()
        flat = torch.frombuffer(mm, dtype=dtype, count=count, offset=8 + n + start) if count else torch.empty(0, dtype=dtype)
        # PyTorch's packed int8/int4 kernels read past 8-byte alignment with wide loads and crash
        # on a misaligned weight (seen with _weight_int8pack_mm at several rows): copy those.
        tensors[name] = flat.view(info["shape"]) if (8 + n + start) % 64 == 0 else flat.view(info["shape"]).clone()
    return meta, tensors


def load(path: Path, config: ModelConfig) -> nn.Module | None:
    """The cached model, or None when the file is missing or not ours (the caller converts anew)."""
    mapped = _mapped_tensors(path)
    if mapped is None:
        return None
    meta, state = mapped
    if meta.get("format") != FORMAT:
        return None
    modules = json.loads(meta["modules"])
    per_module: dict[str, dict[str, torch.Tensor]] = {name: {} for name in modules}
    for key in list(state):
        owner, _, leaf = key.rpartition(".")
        if owner in per_module:
            per_module[owner][leaf] = state.pop(key)
    model = build_model(config)
    for name, kind in modules.items():
        if kind != "HeadEmbedding":
            set_module(model, name, quant.restore(kind, per_module[name]))
    if modules.get("embed") == "HeadEmbedding":
        if not isinstance(model.output, quant.Int8Head):
            return None
        set_module(model, "embed", quant.HeadEmbedding(model.output))
    model.load_state_dict(state, assign=True, strict=False)
    if "output" not in modules:  # (a HeadEmbedding is only ever made over a converted head)
        model.tie_weights()
    if any(p.is_meta for p in model.parameters()) or any(b.is_meta for b in model.buffers()):
        return None
    return model.eval()
