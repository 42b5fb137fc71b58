"""Checkpoints that a crash at any moment cannot spoil.

A checkpoint is a folder `RUN/checkpoints/step-00000100/`:

    model.safetensors      trainable parameters, by name (all of them, or the LoRA adapter only)
    optimizer.safetensors  optimizer moments by parameter index, and each rank's RNG state
    state.json             step, data position, scheduler and optimizer hyper-parameters, Python RNG
    COMPLETE               written last: names every file and its size

It is built under a temporary name in the same `checkpoints/` folder; each file is written to a
temporary name, fsynced and renamed; the folder is fsynced and renamed to its final name; then the
COMPLETE marker goes in the same way. `latest(run)` returns the newest folder whose marker exists and
whose files have the sizes it lists, so a `kill -9` while saving leaves the previous checkpoint as
the newest. Older complete checkpoints beyond `keep` are removed only after the new one is complete.
No pickle is written or read: tensors go to safetensors, the rest to JSON.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from llmos.errors import LlmosError
from llmos.files import commit, fsync_dir, write_atomically

FOLDER = "checkpoints"
MARKER = "COMPLETE"
_NAME = re.compile(r"step-(\d{8})")


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    commit(tmp, path)


def _write_json(path: Path, data: Any) -> None:
    write_atomically(path, json.dumps(data, indent=1))


def save(run: Path, step: int, files: dict[str, dict[str, torch.Tensor]], state: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint `step` atomically; `files` maps "model.safetensors" etc. to their tensors."""
    root = Path(run) / FOLDER
    root.mkdir(parents=True, exist_ok=True)
    for leftover in root.glob(".step-*"):  # what a killed save left behind: never complete
        shutil.rmtree(leftover, ignore_errors=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp-{os.getpid()}"
    tmp.mkdir()
    for name, tensors in files.items():
        _write_tensors(tmp / name, tensors)
    _write_json(tmp / "state.json", state)  # fsyncs `tmp`, so the tensor files' entries too
    if final.exists():  # an incomplete folder from a killed run that reached this step before
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(root)
    sizes = {p.name: p.stat().st_size for p in sorted(final.iterdir())}
    _write_json(final / MARKER, {"step": step, "files": sizes})
    _prune(root, keep)
    return final


def is_complete(folder: Path) -> bool:
    try:
        marker = json.loads((folder / MARKER).read_text())
        return all((folder / name).stat().st_size == size for name, size in marker["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def complete(run: Path) -> list[Path]:
    """Complete checkpoints of `run`, oldest first."""
    root = Path(run) / FOLDER
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.fullmatch(p.name) and is_complete(p)]
    return sorted(found, key=lambda p: p.name)


def latest(run: Path) -> Path | None:
    done = complete(run)
    return done[-1] if done else None


def require_latest(run: Path) -> Path:
    found = latest(run)
    if found is None:
        root = Path(run) / FOLDER
        partial = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
        why = f"only incomplete ones ({', '.join(partial)})" if partial else "none at all"
        raise LlmosError(f"{run} has no complete checkpoint to resume from ({why}); start it again: the same "
                         f"pretrain/finetune command with --out {run} (a run with no complete checkpoint counts as "
                         "empty), or add --restart to discard any run there")
    return found


def load(folder: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """(tensors by file name, state.json) of a complete checkpoint."""
    if not is_complete(folder):
        raise LlmosError(f"{folder} is not a complete checkpoint")
    tensors = {p.name: load_file(str(p)) for p in sorted(folder.glob("*.safetensors"))}
    return tensors, json.loads((folder / "state.json").read_text())


def _prune(root: Path, keep: int) -> None:
    steps = sorted((p for p in root.iterdir() if _NAME.fullmatch(p.name)), key=lambda p: p.name)
    done = [p for p in steps if is_complete(p)]
    newest = done[-1].name if done else ""
    # Older complete ones beyond `keep`, and incomplete ones a kill left behind the newest.
    stale = done[: max(len(done) - keep, 0)] + [p for p in steps if p.name < newest and p not in done]
    for old in stale:
        # Drop the marker first: a half-removed folder must never look complete.
        (old / MARKER).unlink(missing_ok=True)
        shutil.rmtree(old, ignore_errors=True)
