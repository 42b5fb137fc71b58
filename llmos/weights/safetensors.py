"""Hugging Face safetensors checkpoints: one `model.safetensors`, or shards listed in
`model.safetensors.index.json`. Tensors are read from memory-mapped files one at a time; nothing
here knows about models. Pickle checkpoints are refused: unpickling runs arbitrary code.

An index is a file from the internet: every shard it names must resolve, after symlinks, inside the
model folder (or, for a Hugging Face cache snapshot, inside that repository's blobs/), so a
`../../secret.safetensors` or an absolute path is refused, never read. A name listed twice is refused.
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
                weight_map = json.loads(index.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicates)["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise LlmosError(f"{index} is not a valid safetensors index ({exc}); re-download or re-save the model") from None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise LlmosError(f"{index}: weight_map must map tensor names to shard file names; re-save the model")
            self._where = {name: self._shard(shard, index) for name, shard in weight_map.items()}
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

    def _shard(self, shard: str, index: Path) -> Path:
        """The shard's path, refused unless it resolves inside the model folder (see the module doc)."""
        path = self.folder / shard
        roots = [self.folder.resolve()]
        if self.folder.parent.name == "snapshots":  # the Hugging Face cache links snapshot files to ../../blobs
            roots.append((self.folder.parent.parent / "blobs").resolve())
        try:
            resolved = path.resolve()
        except (OSError, RuntimeError, ValueError) as exc:  # a symlink loop, a NUL in the name
            raise LlmosError(f"{index}: shard {shard!r} cannot be resolved ({exc}); refusing it") from None
        if not any(resolved.is_relative_to(root) for root in roots):
            raise LlmosError(f"{index} names shard {shard!r}, which is outside the model folder {self.folder}; "
                             "refusing to read it (a model's shards must be files inside its folder)")
        return path

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
        path = self._where[name]
        try:
            return self._open(path).get_tensor(name)
        except LlmosError:
            raise
        except Exception as exc:  # safetensors' own errors: a name the shard lacks, a dtype torch cannot hold
            raise LlmosError(f"{path}: cannot read tensor {name!r} ({exc}); the checkpoint is corrupt") from None

    def shapes(self) -> dict[str, tuple[int, ...]]:
        out = {}
        for n in self._names:
            try:
                out[n] = tuple(self._open(self._where[n]).get_slice(n).get_shape())
            except LlmosError:
                raise
            except Exception as exc:
                raise LlmosError(f"{self._where[n]}: no readable tensor {n!r} ({exc}); the checkpoint is corrupt") from None
        return out


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"{dup!r} is listed twice")
    return out
