"""File operations shared across llmos: where llmos keeps its files (`home`), durable writes for
everything that must not lose what a user saved, and the JSON-lines reading of every data and
evaluation set."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmos.errors import LlmosError

# Checkpoint files whose loading unpickles, and so can run arbitrary code: llmos refuses them.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def home() -> Path:
    """The store's root folder: `$LLMOS_HOME`, default `~/.cache/llmos`, created on first use.

    An LlmosError naming LLMOS_HOME when it is a file or cannot be created, rather than the
    `[Errno 20] Not a directory` of whichever file llmos first tried to write under it."""
    configured = os.environ.get("LLMOS_HOME")
    root = Path(configured or Path.home() / ".cache" / "llmos").expanduser()
    if root.is_dir():
        return root
    where = f"LLMOS_HOME={configured}" if configured else f"the model store {root} (set LLMOS_HOME to use another folder)"
    if root.exists():
        raise LlmosError(f"{where} is not a folder")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LlmosError(f"{where} cannot be created: {exc.strerror or exc}") from None
    return root


def fsync_dir(folder: Path) -> None:
    """Make renames and new entries in `folder` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def commit(tmp: Path, final: Path) -> None:
    """fsync the finished file `tmp`, rename it over `final`, fsync the folder: `final` is then the
    old file or the new one, never half of one."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    fsync_dir(final.parent)


def temp_for(path: Path) -> Path:
    """Where to write a file before `commit` puts it at `path`: beside it, hidden, per process."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def sha256_of(paths: list[Path]) -> str:
    """The sha256 (hex) of the files' bytes, one after another, read in 1 MB chunks."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def write_atomically(path: Path, data: bytes | str) -> None:
    """Write `data` (str as UTF-8) so that a crash leaves either the old file or the new one."""
    path = Path(path)
    tmp = temp_for(path)
    tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    commit(tmp, path)


def json_lines(path: Path, text: str | None = None) -> Iterator[tuple[int, Any]]:
    """(line number, value) for each non-blank line of a JSON-lines file (`text`: its contents, when
    already read); a line that is not JSON is an LlmosError naming the file and line."""
    if text is None:
        if not Path(path).is_file():
            raise LlmosError(f"no such file: {path}")
        text = Path(path).read_text(encoding="utf-8")
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError as exc:
            raise LlmosError(f"{path}:{number}: not valid JSON ({exc}); each line must be one JSON value") from None
        yield number, value
