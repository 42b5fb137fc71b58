"""Compiling llmos's C++ extensions (native_step.cpp, gguf_kernels.cpp) once per machine.

Each is built into $LLMOS_HOME/native, in a folder named by its source, its flags, PyTorch's version
and the CPU's features, so a store shared by machines never hands one a binary built for another. A
binary damaged by a crash mid-build is built again. Nothing here raises: a missing compiler, a store
that cannot be written or a failed build comes back as the reason, and the caller runs its Python path.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import threading
from pathlib import Path
from types import ModuleType

import torch

from llmos.errors import LlmosError
from llmos.files import home

# Built for the CPU it runs on (-march=native) without contracting a * b + c into fused multiply-adds,
# which would change the bits the loops must share with the Python ops; with OpenMP, without which
# at::parallel_for in an extension runs on one thread (the process then shares PyTorch's own libgomp,
# loaded first under the same name).
CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"]


def _cpu_flags() -> bytes:
    try:
        return next((line for line in Path("/proc/cpuinfo").read_bytes().splitlines() if line.startswith(b"flags")), b"")
    except OSError:
        return b""


def build_dir(source: Path, prefix: str, cflags: list[str] = CFLAGS) -> Path:
    key = source.read_bytes() + " ".join(cflags).encode() + torch.__version__.encode() + _cpu_flags()
    digest = hashlib.sha256(key).hexdigest()[:16]
    return home() / "native" / f"{prefix}torch-{torch.__version__}-{digest}"


def _import(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compile_once(name: str, source: Path, *, prefix: str, what: str, fallback: str, seconds: int,
                 quiet: bool = False, cflags: list[str] = CFLAGS) -> tuple[ModuleType | None, str | None]:
    """(module, None) once built or found built; (None, why) otherwise. `what` names the extension in
    messages ("the native decode step"), `fallback` what runs instead ("the Python decode step")."""
    try:
        built = build_dir(source, prefix, cflags) / f"{name}.so"
    except LlmosError as exc:  # a store it cannot use (LLMOS_HOME a file)
        return None, f"build failed: {exc} - using {fallback}"
    if built.exists():
        try:
            return _import(name, built), None
        except (ImportError, OSError):  # damaged by a crash mid-build: build it again
            built.unlink()
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return None, f"no C++ compiler on PATH (install g++) - using {fallback}"
    from torch.utils.cpp_extension import load

    if not quiet:
        print(f"llmos: compiling {what} (once, ~{seconds} s)...", file=sys.stderr, flush=True)
    try:
        built.parent.mkdir(parents=True, exist_ok=True)
        return load(name, [str(source)], build_directory=str(built.parent), extra_cflags=cflags,
                    extra_ldflags=["-fopenmp"], verbose=False), None
    except Exception as e:  # a broken toolchain or a read-only store must not stop text generation
        failed = f"building {what} failed ({str(e).strip().splitlines()[-1][:200]}) - using {fallback}"
        if not quiet:
            print(f"llmos: {failed}", file=sys.stderr)
        return None, failed


def enabled() -> bool:
    """False when the user turned the C++ extensions off (LLMOS_NATIVE=0)."""
    return os.environ.get("LLMOS_NATIVE", "1") != "0"


class Extension:
    """One C++ extension, compiled and imported at most once per process (`build`), or the reason it
    could not be (`failure`); what `compile_once` takes, given once."""

    def __init__(self, name: str, source: Path, *, prefix: str, what: str, fallback: str, seconds: int,
                 cflags: list[str] = CFLAGS) -> None:
        self.name, self.source, self.prefix, self.what, self.fallback = name, source, prefix, what, fallback
        self.seconds, self.cflags = seconds, cflags
        self.module: ModuleType | None = None
        self.failed: str | None = None
        self._lock = threading.Lock()

    def build(self, quiet: bool = False) -> ModuleType | None:
        """The imported extension; None when it cannot be built (reason in `failure()`) or is turned off."""
        if self.module is not None:  # built: no lock (the GGUF layers ask on every product)
            return self.module
        with self._lock:
            if self.module is None and self.failed is None and enabled():
                self.module, self.failed = compile_once(self.name, self.source, prefix=self.prefix, what=self.what,
                                                        fallback=self.fallback, seconds=self.seconds, quiet=quiet,
                                                        cflags=self.cflags)
            return self.module

    def failure(self) -> str | None:
        return self.failed
