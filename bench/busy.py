"""Decode beside a busy neighbour: what one busy core does to 2 threads, 1 thread and llmos's choice.

    python -m bench.run --only busy        # ~1.5 min on 2 cores; a section of `make bench`

A busy-loop process pinned to the first core plays the other work of a shared machine. In a fresh
process per measurement (OpenMP reads its settings when torch loads), the default model in the form
`auto` picks decodes `TOKENS` tokens greedily at batch 1 with threads=2 and threads=1, with and
without the neighbour, under the two ways OpenMP workers can wait that llmos chooses between
(llmos/threads.py): "spin" (GOMP_SPINCOUNT=threads.SPIN: a bounded spin, then sleep; `import llmos`
on an idle machine) and "passive" (sleep at once; on a busy one); then "llmos" (neither set and
threads=auto: what a user gets, llmos choosing both from what it measures of the other work).
(libgomp's own default, a ~3 ms spin, measured as "spin" idle and worse beside a busy process: left out.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

TOKENS = 32
POLICIES = ("spin", "passive")
THREADS = ("2", "1", "auto")


def worker(threads: str) -> dict:
    """Run in a child whose environment holds the policy (or not: llmos chooses): one decode, as JSON."""
    import llmos  # first: it chooses how OpenMP's workers wait unless the environment says
    import torch
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
            "form": llm.dtype, "wait_policy": os.environ.get("OMP_WAIT_POLICY"), "spin": os.environ.get("GOMP_SPINCOUNT")}


def _measure(threads: str, policy: str) -> dict:
    from llmos.threads import SPIN

    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if policy == "spin":
        env["GOMP_SPINCOUNT"] = str(SPIN)
    elif policy == "passive":
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

    def measure_all(where: str) -> None:
        for policy in POLICIES:
            results[f"{where}, {policy}"] = {t: _measure(t, policy) for t in ("2", "1")}
        results[f"{where}, llmos"] = {"auto": _measure("auto", "llmos")}

    measure_all("no neighbour")
    hog = _neighbour()
    try:
        measure_all("busy core")
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
            c = cells["auto"]
            print(f"  {row}: chose {c['threads_used']} thread(s), OMP_WAIT_POLICY={c['wait_policy']}, GOMP_SPINCOUNT={c['spin']}")
    first = next(iter(results.values()))["2"]
    print(f"  form {first['form']}; load average at the end {os.getloadavg()[0]:.2f} (other work counts too)")
    return results


if __name__ == "__main__":
    print(json.dumps(worker(sys.argv[1])))
