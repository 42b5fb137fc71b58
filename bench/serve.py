"""`python -m bench.serve`: a load run of `llmos serve` beside llama-cpp-python's OpenAI server.

Both servers get the same GGUF (the default model), the same thread count and the same client:
1, 4 and 16 concurrent clients stream chat completions (greedy, 64 tokens at most, varied prompts);
each client sends its requests one after another. Reported per concurrency level: aggregate tokens/s
(content chunks received, all clients, over the wall time of the level: both servers send one chunk
per token, llmos fewer when several tokens make one character), p50 and p95 time to first token.
The llama.cpp column appears when `llama_cpp.server` is importable (`make bench-deps` installs it with
its server extras); otherwise it is skipped. llama-cpp-python's server runs one request at a time
(queued with --interrupt_requests False; by default a new request cuts off the one streaming). Results go to bench/results/serve-DATE.json.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

import httpx

from llmos import store

RESULTS = Path(__file__).parent / "results"
LEVELS = (1, 4, 16)
PROMPTS = [
    "Write a short poem about the sea.", "Explain what a CPU cache is.", "Give three tips for learning to cook.",
    "What is the capital of France, and why is it famous?", "Describe a rainy afternoon in a city.",
    "How do vaccines work?", "Tell me a short story about a robot.", "What are prime numbers?",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(engine: str, gguf: Path, threads: int, port: int) -> subprocess.Popen:
    if engine == "llmos":
        cmd = [sys.executable, "-m", "llmos", "serve", "--model", store.DEFAULT_CHAT_MODEL, "--port", str(port),
               "--threads", str(threads), "--log-level", "warning"]
    else:
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
               "--n_threads", str(threads), "--n_ctx", "2048", "--chat_format", "chatml",
               # By default a new request cuts off the one streaming (its stream just ends): queue them.
               "--interrupt_requests", "False"]
    env = {**os.environ}
    env.pop("LLMOS_API_KEY", None)
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


def wait_ready(proc: subprocess.Popen, url: str, timeout: float = 600) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200 and \
                    httpx.get(url + "/health", timeout=2).status_code in (200, 404):
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError("server did not become ready")


async def one_request(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> tuple[float, int]:
    """(seconds to the first content chunk, content chunks) for one streamed chat completion."""
    body = {"model": store.DEFAULT_CHAT_MODEL, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    first, chunks = None, 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or []
            if choices and (choices[0].get("delta") or {}).get("content"):
                chunks += 1
                if first is None:
                    first = time.perf_counter() - t0
    return (first if first is not None else time.perf_counter() - t0), chunks


async def level(url: str, clients: int, per_client: int, max_tokens: int) -> dict[str, float]:
    async with httpx.AsyncClient(base_url=url, timeout=1800) as client:
        async def worker(i: int) -> list[tuple[float, int]]:
            return [await one_request(client, PROMPTS[(i + k) % len(PROMPTS)], max_tokens) for k in range(per_client)]

        t0 = time.perf_counter()
        results = [x for xs in await asyncio.gather(*(worker(i) for i in range(clients))) for x in xs]
        wall = time.perf_counter() - t0
    ttfts = sorted(t for t, _ in results)
    tokens = sum(n for _, n in results)
    return {"clients": clients, "requests": len(results), "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "ttft_p50_s": statistics.median(ttfts),
            "ttft_p95_s": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))]}


def measure(engine: str, gguf: Path, threads: int, max_tokens: int, requests: int) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start(engine, gguf, threads, port)
    try:
        ready = wait_ready(proc, url)
        asyncio.run(level(url, 1, 1, 8))  # warm-up
        out = {"ready_s": ready, "levels": {}}
        for c in LEVELS:
            out["levels"][str(c)] = asyncio.run(level(url, c, max(1, requests // c), max_tokens))
            print(f"{engine}: {out['levels'][str(c)]}", file=sys.stderr)
        return out
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def table(results: dict[str, Any]) -> str:
    engines = [e for e in results["engines"] if results["engines"][e]]
    head = f"{'clients':>8}" + "".join(f"{e + ' tok/s':>18}{'p50 ttft':>10}{'p95 ttft':>10}" for e in engines)
    if len(engines) == 2:
        head += f"{'tok/s ratio':>13}"
    lines = [head, "-" * len(head)]
    for c in LEVELS:
        row = f"{c:>8}"
        for e in engines:
            r = results["engines"][e]["levels"][str(c)]
            row += f"{r['tokens_per_s']:>18.1f}{r['ttft_p50_s']:>10.2f}{r['ttft_p95_s']:>10.2f}"
        if len(engines) == 2:
            a, b = (results["engines"][e]["levels"][str(c)]["tokens_per_s"] for e in engines)
            row += f"{a / b:>12.2f}x"
        lines.append(row)
    return "\n".join(lines)


def run(threads: int = 2, max_tokens: int = 64, requests: int = 4) -> dict[str, Any]:
    """Measure both servers; returns the results (also written to bench/results/serve-DATE.json)."""
    gguf = store.pull(store.DEFAULT_CHAT_MODEL)
    have_llama = importlib.util.find_spec("llama_cpp") is not None and importlib.util.find_spec("sse_starlette") is not None
    results: dict[str, Any] = {
        "date": str(date.today()), "machine": platform.machine(), "threads": threads, "model": gguf.name,
        "max_tokens": max_tokens, "requests_per_level": requests,
        "engines": {"llmos": measure("llmos", gguf, threads, max_tokens, requests),
                    "llama.cpp": measure("llama.cpp", gguf, threads, max_tokens, requests) if have_llama else None},
    }
    if not have_llama:
        results["skipped"] = "llama.cpp: llama_cpp.server is not importable (make bench-deps; pip install 'llama-cpp-python[server]')"
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"serve-{date.today()}.json"
    out.write_text(json.dumps(results, indent=2))
    results["written"] = str(out)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=4, help="requests per level at 1 client (at least one per client)")
    args = parser.parse_args()
    results = run(args.threads, args.max_tokens, args.requests)
    print(f"\nllmos serve load run {results['date']}, {args.threads} threads, {results['model']}, "
          f"greedy, max_tokens {args.max_tokens}")
    print(table(results))
    if results.get("skipped"):
        print(f"(skipped {results['skipped']})")
    print(f"\nwritten {results['written']}")


if __name__ == "__main__":
    main()
