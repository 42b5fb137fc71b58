"""How many CPU threads llmos computes with, chosen the same way by the CLI, the Python API and the
server: the cores this process may use, less those other work keeps busy."""

from __future__ import annotations

import os


def auto_threads() -> int:
    """CPU threads for this process: the cores it may use, less those other work keeps busy.

    PyTorch's OpenMP threads spin-wait on each other; when another process holds a core, a decode
    step with 2 threads on 2 cores ran 2-3x slower than with 1 (measured: 48 vs 98 tok/s; answering
    questions through the Python API, 10-27x), while on an idle machine 1 thread costs little. The
    1-minute load average says how busy the cores are.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return max(1, min(cores, round(cores - busy)))
