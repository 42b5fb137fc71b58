"""How many CPU threads llmos computes with, chosen the same way by the CLI, the Python API and the
server: the cores this process may use, less those other work keeps busy; and how they wait.

`import llmos` sets OMP_WAIT_POLICY=passive unless the environment names a policy or torch is already
imported (OpenMP reads the variable once, when torch loads it, and has no call to change it later:
the import of llmos is the last moment llmos can choose it, hence this one change at import).
Passive workers sleep between parallel regions instead of spinning; with a busy neighbour on one of
two cores, 2-thread decode of the default model went from 12 to 86 tok/s (`make bench`, section busy).
"""

from __future__ import annotations

import os
import sys


def prefer_passive_wait() -> None:
    """OMP_WAIT_POLICY=passive for this process and its children, unless already chosen or too late."""
    if "OMP_WAIT_POLICY" not in os.environ and "torch" not in sys.modules:
        os.environ["OMP_WAIT_POLICY"] = "passive"


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
