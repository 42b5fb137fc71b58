"""Files the store derives from a model, keyed by the model's content, not its path.

    $LLMOS_HOME/converted/KEY-FORM.safetensors   the model converted to a fast weight form (weights/converted.py)
    $LLMOS_HOME/quality/KEY.json                 the quality verdict `--dtype auto` reads (quality.py)
    $LLMOS_HOME/tokenizers/KEY-merges.bin        the merges a Gemma vocabulary implies (tokenizer.py: ~1 s to derive)
    $LLMOS_HOME/sources/ID.json                  {"key", "path"}: a model path (at its size and mtime) -> KEY

KEY is a sha256 of the weights' bytes, so every path to the same file (a store model, a copy, a
symlink) shares one converted copy; it is computed once per path and modification time (~0.1 s per
100 MB) and remembered in sources/. A model keeps one converted copy: converting it to another form
replaces the old one. `entries()` lists what is there with sizes (`llmos list`), `forget(path)`
frees a model's derived files (`llmos rm`), and `prune()` frees those of models that are gone or
changed, and anything else no later load will read (`llmos prune`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from llmos import store
from llmos.files import sha256_of, write_atomically

@dataclass(frozen=True)
class Derived:
    key: str
    files: tuple[Path, ...]
    size: int  # bytes, all files together
    sources: tuple[str, ...]  # the model paths known to have this content


def _weights(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(path.glob("*.safetensors")) or [path / "config.json"]


def _identity(path: Path) -> str:
    parts = [f"{w.resolve()}|{w.stat().st_size}|{w.stat().st_mtime_ns}" for w in _weights(path)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def content_key(path: Path) -> str:
    """The sha256 (24 hex digits) of a model's weights, remembered per path and modification time."""
    memo = store.home() / "sources" / f"{_identity(path)}.json"
    try:
        return json.loads(memo.read_text())["key"]
    except (OSError, ValueError, KeyError):
        pass
    key = sha256_of(_weights(path))[:24]
    memo.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(memo, json.dumps({"key": key, "path": str(path.resolve())}))
    return key


def converted_file(path: Path, form: str) -> Path:
    return store.home() / "converted" / f"{content_key(path)}-{form}.safetensors"


def verdict_file(path: Path) -> Path:
    return store.home() / "quality" / f"{content_key(path)}.json"


def merges_file(path: Path) -> Path:
    return store.home() / "tokenizers" / f"{content_key(path)}-merges.bin"


def keep_only(kept: Path) -> None:
    """A model keeps one converted copy: drop its other forms once `kept` is written."""
    key = kept.name.split("-")[0]
    for other in kept.parent.glob(f"{key}-*.safetensors"):
        if other != kept:
            other.unlink(missing_ok=True)


def _files_by_key() -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    for folder, pattern in (("converted", "*.safetensors"), ("quality", "*.json"), ("tokenizers", "*-merges.bin")):
        for file in sorted((store.home() / folder).glob(pattern)):
            found.setdefault(file.name.split("-")[0].removesuffix(".json"), []).append(file)
    return found


def _sources() -> dict[Path, dict[str, str]]:
    memos = {}
    for memo in sorted((store.home() / "sources").glob("*.json")):
        try:
            memos[memo] = json.loads(memo.read_text())
        except (OSError, ValueError):
            memos[memo] = {}
    return memos


def entries() -> list[Derived]:
    """What the store holds beside the models: one entry per model content, with its sources."""
    by_key: dict[str, set[str]] = {}
    for info in _sources().values():
        if "key" in info and Path(info.get("path", "")).exists():
            by_key.setdefault(info["key"], set()).add(info["path"])
    return [Derived(key, tuple(files), sum(f.stat().st_size for f in files), tuple(sorted(by_key.get(key, ()))))
            for key, files in _files_by_key().items()]


def forget(path: Path) -> int:
    """Delete the derived files of the model at `path`; returns the bytes freed."""
    key = content_key(path)
    freed = 0
    for file in _files_by_key().get(key, []):
        freed += file.stat().st_size
        file.unlink(missing_ok=True)
    for memo, info in _sources().items():
        if info.get("key") == key:
            memo.unlink(missing_ok=True)
    return freed


def prune() -> int:
    """Delete derived files no later load will read: those of models whose every known path is
    gone or changed, and converted copies from before this layout. Returns the bytes freed."""
    live: set[str] = set()
    for memo, info in _sources().items():
        path = Path(info.get("path", ""))
        if not path.exists() or memo.stem != _identity(path):  # gone, or changed since (a new key then)
            memo.unlink(missing_ok=True)
        else:
            live.add(info["key"])
    freed = 0
    for key, files in _files_by_key().items():
        if key not in live:
            for file in files:
                freed += file.stat().st_size
                file.unlink(missing_ok=True)
    return freed
