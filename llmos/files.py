"""Durable file operations shared by everything that must not lose what a user saved."""

from __future__ import annotations

import os
from pathlib import Path

# Checkpoint files whose loading unpickles, and so can run arbitrary code: llmos refuses them.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


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


def write_atomically(path: Path, data: bytes | str) -> None:
    """Write `data` (str as UTF-8) so that a crash leaves either the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    commit(tmp, path)
