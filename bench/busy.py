"""Decode beside a busy neighbour: what one busy core does to 2 threads, 1 thread and llmos's choice.

    python -m bench.run --only busy        # ~1.5 min on 2 cores; a section of `make bench`

A busy-loop process pinned to the first core plays the other work of a shared machine. In a fresh
process per measurement (OpenMP reads its settings when torch loads), the default model in the form
`auto` picks decodes `TOKENS` tokens greedily at batch 1 with threads=2, threads=1 and threads=auto
(`llmos.load(threads=None)`: the cores the load average leaves idle), with and without the neighbour,
under two OpenMP wait policies: libgomp's default (workers spin a while, then sleep: what llmos ran
with before it chose; measured by loading torch before llmos, which then leaves the policy alone)
and passive (they sleep at once: what `import llmos` sets when OMP_WAIT_POLICY is unset,
llmos/threads.py). (OMP_WAIT_POLICY=active, spinning only, was slower still: 0.9-1.9 tok/s with 2
threads on a loaded machine, so it is left out to keep the section short.) The 1-minute load average only sees a new
neighbour after ~45 s (it is an average): threads=auto is measured last, after the neighbour has run
that long, as on a machine where the other work is not brand new.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

TOKENS = 32
POLICIES = ("default", "passive")
THREADS = ("2", "1", "auto")
SETTLE_S = 45  # the neighbour runs this long before threads=auto is measured


def worker(threads: str) -> dict:
    """Run in a child whose environment already holds OMP_WAIT_POLICY: one decode, as JSON."""
    import torch

    import llmos
    from llmos import store
    from llmos.engine.generate import Generation
    from llmos.engine.sampling import SamplingParams

    llm = llmos.load(store.DEFAULT_CHAT_MODEL, threads=None if threads == "auto" else int(threads), quiet=True)
    prompt = llm.encode("The history of the printing press begins")
    greedy = SamplingParams(temperature=0.0)
    list(Generation(llm.model, prompt, max_new_tokens=4, params=greedy, min_new_tokens=4).tokens())  # warm
    it = Generation(llm.model, prompt, max_new_tokens=TOKENS + 1, params=greedy, min_new_tokens=TOKENS + 1).tokens()
    next(it)
    t0 = time.perf_counter()
    n = sum(1 for _ in it)
    return {"decode_tps": n / (time.perf_counter() - t0), "threads_used": torch.get_num_threads(),
            "form": llm.dtype, "wait_policy": os.environ.get("OMP_WAIT_POLICY")}


def _measure(threads: str, policy: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")}
    if policy != "default":
        env["OMP_WAIT_POLICY"] = policy
    out = subprocess.run([sys.executable, "-m", "bench.busy", threads], capture_output=True, text=True, env=env,
                         timeout=600)
    if out.returncode:
        raise RuntimeError(f"threads={threads} {policy}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _neighbour() -> subprocess.Popen:
    """A busy loop pinned to the first core this process may use."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    os.sched_setaffinity(proc.pid, {min(os.sched_getaffinity(0))})
    return proc


def run() -> dict:
    from llmos import store

    store.pull(store.DEFAULT_CHAT_MODEL, quiet=True)
    results: dict[str, dict[str, dict]] = {}
    for policy in POLICIES:  # no neighbour: what each policy costs when nothing of ours competes
        results[f"no neighbour, {policy}"] = {"2": _measure("2", policy)}
    hog = _neighbour()
    started = time.monotonic()
    try:
        for policy in POLICIES:
            results[f"busy core, {policy}"] = {t: _measure(t, policy) for t in ("2", "1")}
        time.sleep(max(0.0, SETTLE_S - (time.monotonic() - started)))  # let the load average see it
        for policy in POLICIES:
            results[f"busy core, {policy}"]["auto"] = _measure("auto", policy)
    finally:
        hog.kill()
        hog.wait()
    head = f"{'decode tok/s (' + str(TOKENS) + ' tokens)':<30}" + "".join(f"{'threads=' + t:>14}" for t in THREADS)
    print(head)
    print("-" * len(head))
    for row, cells in results.items():
        line = "".join(f"{cells[t]['decode_tps']:>14.1f}" if t in cells else f"{'-':>14}" for t in THREADS)
        print(f"{row:<30}{line}")
    for row, cells in results.items():
        if "auto" in cells:
            print(f"  {row}: threads=auto chose {cells['auto']['threads_used']}")
    first = next(iter(results.values()))["2"]
    print(f"  form {first['form']}; load average at the end {os.getloadavg()[0]:.2f} (other work counts too)")
    return results


if __name__ == "__main__":
    if "OMP_WAIT_POLICY" not in os.environ:
        import torch  # noqa: F401  loaded before llmos: OpenMP keeps its own default policy
    print(json.dumps(worker(sys.argv[1])))
