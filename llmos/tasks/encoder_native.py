"""The encoder's attention in C++ (encoder_attention.cpp): packed texts, no padding, no mask.

`packed_attention()` returns the kernel `(qkv (N, 3C), offsets (B+1,), n_heads) -> (N, C)` that
`models.bert.Packing` takes, or None where it cannot be built (no compiler, LLMOS_NATIVE=0); the
encoder then attends with PyTorch's SDPA per group of equal-length texts. Compiled once per source,
flags, PyTorch version and CPU into $LLMOS_HOME/native (~20 s), like the decode step's extension.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from llmos.errors import LlmosError
from llmos.files import home

SOURCE = Path(__file__).with_name("encoder_attention.cpp")
# -ffast-math lets the compiler vectorize exp (glibc's libmvec); the kernel is compared with SDPA in
# tests/tasks/test_embed_forms.py rather than held to bit equality.
CFLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-ffast-math", "-fopenmp"]
_lock = threading.Lock()
_kernel: Callable | None = None
_tried = False


def packed_attention(quiet: bool = True) -> Callable | None:
    """The compiled kernel (built on first call), or None where it cannot be had."""
    global _kernel, _tried
    with _lock:
        if _tried or os.environ.get("LLMOS_NATIVE", "1") == "0":
            return _kernel
        _tried = True
        try:
            _kernel = _build(quiet).packed_attention
        except Exception as exc:  # no compiler, a read-only store: the SDPA path runs
            if not quiet:
                print(f"llmos: the encoder's attention kernel is not available ({str(exc).strip()[:200]}); using SDPA",
                      file=sys.stderr)
        return _kernel


def _build(quiet: bool):
    cpu = next((line for line in Path("/proc/cpuinfo").read_bytes().splitlines() if line.startswith(b"flags")), b"") \
        if Path("/proc/cpuinfo").exists() else b""
    key = SOURCE.read_bytes() + " ".join(CFLAGS).encode() + torch.__version__.encode() + cpu
    folder = home() / "native" / f"encoder-torch-{torch.__version__}-{hashlib.sha256(key).hexdigest()[:16]}"
    built = folder / "llmos_encoder_attention.so"
    if built.exists():
        import importlib.util

        spec = importlib.util.spec_from_file_location("llmos_encoder_attention", built)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        raise LlmosError("no C++ compiler on PATH")
    from torch.utils.cpp_extension import load

    if not quiet:
        print("llmos: compiling the encoder's attention kernel (once, ~20 s)...", file=sys.stderr, flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    return load("llmos_encoder_attention", [str(SOURCE)], build_directory=str(folder), extra_cflags=CFLAGS,
                extra_ldflags=["-fopenmp"], verbose=False)
