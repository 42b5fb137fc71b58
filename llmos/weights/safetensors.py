"""Hugging Face safetensors checkpoints: one `model.safetensors`, or shards listed in
`model.safetensors.index.json`. Tensors are read from memory-mapped files one at a time; nothing
here knows about models. Pickle checkpoints are refused: unpickling runs arbitrary code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from llmos.errors import LlmosError
from llmos.files import PICKLE_SUFFIXES



def refuse_pickle(path: Path) -> None:
    raise LlmosError(
        f"{path} is a pickle checkpoint; llmos refuses those because loading one can run arbitrary code. "
        "Convert it to safetensors (e.g. save_pretrained(..., safe_serialization=True)) and load the folder"
    )


class SafetensorsCheckpoint:
    """The tensors of a Hugging Face folder, by name, read lazily from the shard that holds each."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        single = self.folder / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise LlmosError(f"{index} is not a valid safetensors index ({exc}); re-download or re-save the model") from exc
            self._where = {name: self.folder / shard for name, shard in weight_map.items()}
        elif single.is_file():
            self._where = None
            self._single = single
        else:
            pickles = [p for p in self.folder.iterdir() if p.suffix in PICKLE_SUFFIXES] if self.folder.is_dir() else []
            if pickles:
                refuse_pickle(pickles[0])
            raise LlmosError(f"no model.safetensors or model.safetensors.index.json in {self.folder}")
        self._handles: dict[Path, object] = {}
        if self._where is None:
            self._names = list(self._open(self._single).keys())
            self._where = {n: self._single for n in self._names}
        else:
            for shard in sorted(set(self._where.values())):
                if not shard.is_file():
                    raise LlmosError(f"shard {shard.name} listed in {index.name} is missing from {self.folder}")
            self._names = list(self._where)

    def _open(self, path: Path):
        handle = self._handles.get(path)
        if handle is None:
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as exc:  # safetensors raises its own error types for corrupt headers
                raise LlmosError(f"{path} is not a readable safetensors file ({exc})") from exc
            self._handles[path] = handle
        return handle

    def names(self) -> list[str]:
        return list(self._names)

    def tensor(self, name: str) -> torch.Tensor:
        return self._open(self._where[name]).get_tensor(name)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(self._open(self._where[n]).get_slice(n).get_shape()) for n in self._names}
