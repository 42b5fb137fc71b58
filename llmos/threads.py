"""How many CPU threads llmos computes with, chosen the same way by the CLI, the Python API and the
server: the cores this process may use, less those other work keeps busy; and how they wait.

Measured on the 2-core machine (`make bench`, section busy; the default model decoding at batch 1):
| | nothing else running | one other busy process |
|---|---|---|
| 2 threads, workers spin a while between parallel regions | ~170 tok/s | ~25-40 (they spin on the core the other work needs) |
| 2 threads, workers sleep at once (OMP_WAIT_POLICY=passive) | ~80 (each region waits for a wake-up) | ~75-90 |
| 1 thread | ~110 | ~105-110 |
So the right pair is 2 spinning threads on an idle machine and 1 thread on a busy one; passive waiting
is a hedge for 2 threads on a busy machine, which the thread choice avoids.

- **How workers wait** is read by OpenMP once, when torch loads it: `import llmos` (the last moment
  llmos can choose) bounds the spin (GOMP_SPINCOUNT=`SPIN`, ~0.1 ms) when the machine is idle, and
  asks for passive waiting when it is not; either only if the environment names neither and torch is
  not loaded yet.
- **How many threads**: `auto_threads()`: the cores this process may use less the cores other
  processes kept busy, measured from /proc/stat over the time since the last look (less this
  process's own CPU time, so its own work never counts as other work); before the first quarter
  second of history (at `import llmos`), the threads of other processes runnable at that moment
  (/proc/loadavg); without /proc, the 1-minute load average (which also counts this process's own
  recent work, and lags a minute).
- **Later**: a process that chose its threads itself (`mark_auto`) looks again before each generation
  (`refresh`, at most once a second): a long chat or a server started on an idle machine drops to fewer
  threads when other work starts, and takes them back when it ends (one whose workers wait passively
  only drops: 2 passive threads decode slower than 1).
"""

from __future__ import annotations

import os
import sys
import time

SPIN = 10_000  # GOMP_SPINCOUNT on an idle machine: spins before a waiting worker sleeps (~0.1 ms)
MIN_INTERVAL = 0.25  # seconds of /proc/stat history that make a measurement (25 clock ticks a core)
REFRESH_EVERY = 1.0  # seconds between two looks by `refresh`

_last: tuple[float, float, float] | None = None  # (wall, machine busy CPU seconds, this process's CPU seconds)
_measured: float | None = None  # other processes' busy cores over the last measured interval
_auto = False  # this process's thread count is llmos's choice, so `refresh` may change it
_refreshed = 0.0


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _machine_busy_seconds() -> float | None:
    """CPU seconds every core of the machine spent busy since boot (/proc/stat), or None."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 5:
        return None
    ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
    busy = sum(ticks) - ticks[3] - (ticks[4] if len(ticks) > 4 else 0)
    return busy / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


def sample() -> None:
    """Remember the machine's and this process's CPU time now (the start of the next measurement)."""
    global _last
    busy = _machine_busy_seconds()
    _last = None if busy is None else (time.monotonic(), busy, _own_seconds())


def _runnable_others() -> float | None:
    """Threads of other processes running or waiting to run right now (/proc/loadavg's count of
    runnable threads, less this one), the least of three looks: a process computing without pause is
    in each, a passing one rarely."""
    counts = []
    for _ in range(3):
        try:
            with open("/proc/loadavg", encoding="ascii") as f:
                counts.append(int(f.read().split()[3].split("/")[0]))
        except (OSError, IndexError, ValueError):
            return None
    return float(max(0, min(counts) - 1))


def others_busy() -> float:
    """Cores other processes keep busy: measured from /proc/stat since the last measurement when that
    is at least MIN_INTERVAL ago; else the last such measurement; else how many threads of other
    processes are runnable now; else (no /proc) the 1-minute load average."""
    global _measured, _last
    busy, now = _machine_busy_seconds(), time.monotonic()
    if busy is not None and _last is not None and now - _last[0] >= MIN_INTERVAL:
        own = _own_seconds()
        _measured = max(0.0, ((busy - _last[1]) - (own - _last[2])) / (now - _last[0]))
        _last = (now, busy, own)
        return _measured
    if _last is None:
        sample()
    if _measured is not None:
        return _measured
    running = _runnable_others()
    if running is not None:
        return running
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def auto_threads() -> int:
    """CPU threads for this process: the cores it may use, less those other work keeps busy.

    PyTorch's OpenMP threads wait on each other at the end of every parallel region; when another
    process holds a core, 2 threads on 2 cores ran 2-4x slower than 1 (answering questions through
    the Python API with spinning workers, 10-27x), while on an idle machine 2 threads decode ~1.5x
    faster than 1."""
    cores = _cores()
    return max(1, min(cores, round(cores - others_busy())))


def wait_policy(threads: int, cores: int) -> dict[str, str]:
    """The OpenMP settings for a process that will compute with `threads` of its `cores`: workers that
    spin a bounded while when it has every core (an idle machine), that sleep at once when not."""
    return {"GOMP_SPINCOUNT": str(SPIN)} if threads >= cores else {"OMP_WAIT_POLICY": "passive"}


def choose_wait_policy() -> None:
    """At `import llmos`: `wait_policy` for the threads `auto_threads` gives now; nothing when the
    environment already says (OMP_WAIT_POLICY or GOMP_SPINCOUNT) or torch has loaded OpenMP."""
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ or "torch" in sys.modules:
        return
    os.environ.update(wait_policy(auto_threads(), _cores()))


def mark_auto() -> None:
    """This process's thread count was chosen by `auto_threads`: `refresh` may change it."""
    global _auto
    _auto = True


def refresh() -> None:
    """Before a generation: if llmos chose the thread count, choose again from what the other work on
    the machine does now (at most once every REFRESH_EVERY seconds)."""
    global _refreshed
    if not _auto or "torch" not in sys.modules:
        return
    now = time.monotonic()
    if now - _refreshed < REFRESH_EVERY:
        return
    _refreshed = now
    import torch

    n, now_threads = auto_threads(), torch.get_num_threads()
    # Passive workers (chosen at import beside other work, or by the user) make 2 threads decode slower
    # than 1 (84.8 against 104.5 tok/s on an idle machine): with them, the count only goes down.
    if n < now_threads or (n > now_threads and os.environ.get("OMP_WAIT_POLICY", "").lower() != "passive"):
        torch.set_num_threads(n)
