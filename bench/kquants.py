"""Matrix-vector products over GGUF blocks: `python -m bench.kquants [--rounds 3] [--threads N] [--baseline REF]`.

For each shape (2048 x 2048, 8192 x 2048 and Gemma 3's 262,144 x 640 head) and each GGUF type, one row
of fp32 activations times the weights, three ways, timed in alternating rounds in one process:

- `kernel`: engine/gguf_kernels.py over the blocks as stored (and its 16-row time per row, `k16/row`);
- `fp32`: today's path for a GGUF type other than Q4_1: the weights dequantized to fp32 at load,
  `F.linear` per call (4-8x the bytes);
- `base` (with `--baseline REF`): the kernels as gguf_kernels.cpp was at git revision REF, built as
  a second extension beside this one, so that a change is timed against its parent in one process;
- `int8`: today's `--dtype int8`: the weights requantized to int8 per channel, `_weight_int8pack_mm`
  with bf16 activations (a second rounding).

It prints each median time, the GB/s of weight bytes the kernel reads, the floor (those bytes / the
read bandwidth measured here by a large torch sum) and the ratios. The blocks are generated (random
codes, realistic scales); K-quants need rows that are a multiple of 256, so the 640-wide head shape
is only run for the 32-element types. Timings on a shared 2-core machine are noisy: compare within a
run only.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
import torch.nn.functional as F

from llmos.engine import extension, gguf_kernels
from llmos.weights.dequant import GGML_TYPES, dequantize
from tests.engine.gguf_blocks import NAMES, random_blocks

SHAPES = [(2048, 2048), (8192, 2048), (262144, 640)]


def read_bandwidth(rounds: int) -> float:
    """Bytes/s of a sum over 1 GiB of fp32 (torch's sum runs on every thread): the read floor."""
    big = torch.ones(1 << 28)
    big.sum()
    times = []
    for _ in range(rounds * 2):
        t = time.perf_counter()
        big.sum()
        times.append(time.perf_counter() - t)
    return big.numel() * 4 / float(np.median(times))


def timed(fn, reps: int) -> float:
    """Median seconds of `reps` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def baseline(ref: str) -> ModuleType:
    """gguf_kernels.cpp as it was at git revision `ref`, built (once per source) under another name."""
    source = subprocess.run(["git", "show", f"{ref}:llmos/engine/gguf_kernels.cpp"], check=True,
                            capture_output=True, cwd=Path(__file__).parent).stdout
    path = Path(tempfile.mkdtemp()) / "gguf_kernels_baseline.cpp"
    path.write_bytes(source)
    ext = extension.Extension(f"{gguf_kernels.NAME}_baseline", path, prefix="gguf-baseline-",
                              what=f"the GGUF kernels at {ref}", fallback="nothing", seconds=30)
    module = ext.build()
    if module is None:
        raise SystemExit(f"the baseline kernels did not build: {ext.failure()}")
    return module


def int8_weights(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (N,)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)  # (N, K)
    return q, scale.to(torch.bfloat16)


def bench_shape(n: int, k: int, rounds: int, bandwidth: float, base: ModuleType | None = None,
                only: set[str] | None = None) -> dict:
    rng = np.random.default_rng(0)
    types = [t for t in sorted(NAMES) if k % GGML_TYPES[t][1] == 0 and (only is None or NAMES[t] in only)]
    raws = {t: torch.from_numpy(random_blocks(t, n, k, rng).reshape(-1)) for t in {*types, 8}}
    # Today's paths time the same per type (dense weights), so they run once per shape, on Q8_0's values.
    w = dequantize(raws[8], 8, (n, k))
    q8, s8 = int8_weights(w)
    x = torch.randn(1, k)
    x16 = torch.randn(16, k)
    xb = x.to(torch.bfloat16)
    reps = max(3, min(50, int(2e8 / (n * k))))
    runs = {("kernel", t): (lambda t=t: gguf_kernels.matmul(x, raws[t], t, n)) for t in types}
    runs |= {("k16", t): (lambda t=t: gguf_kernels.matmul(x16, raws[t], t, n)) for t in types}
    if base is not None:
        runs |= {("base", t): (lambda t=t: base.matmul(x, raws[t], t, n)) for t in types}
    runs[("fp32", None)] = lambda: F.linear(x, w)
    runs[("int8", None)] = lambda: torch.ops.aten._weight_int8pack_mm(xb, q8, s8)
    times: dict = {key: [] for key in runs}
    for _ in range(rounds):  # alternating: every variant once per round
        for key, fn in runs.items():
            times[key].append(timed(fn, reps))
    med = {key: float(np.median(v)) for key, v in times.items()}
    fp32, int8 = med[("fp32", None)], med[("int8", None)]
    print(f"\n{n} x {k}: fp32 F.linear {fp32 * 1e3:.3f} ms ({n * k * 4 / fp32 / 1e9:.1f} GB/s), "
          f"int8pack bf16 {int8 * 1e3:.3f} ms ({n * k / int8 / 1e9:.1f} GB/s)")
    print(f"{'type':6} {'bytes MB':>8} {'kernel ms':>9} {'GB/s':>6} {'floor ms':>8} {'x floor':>7} "
          f"{'k16/row ms':>10} {'vs fp32':>7} {'vs int8':>7}" + (f" {'base ms':>8} {'base GB/s':>9}" if base else ""))
    out: dict = {"fp32_ms": fp32 * 1e3, "int8pack_ms": int8 * 1e3}
    for t in types:
        kern = med[("kernel", t)]
        nbytes = raws[t].numel()
        floor = nbytes / bandwidth
        print(f"{NAMES[t]:6} {nbytes / 1e6:8.1f} {kern * 1e3:9.3f} {nbytes / kern / 1e9:6.1f} {floor * 1e3:8.3f} "
              f"{kern / floor:7.2f} {med[('k16', t)] / 16 * 1e3:10.3f} {fp32 / kern:6.2f}x {int8 / kern:6.2f}x"
              + (f" {med[('base', t)] * 1e3:8.3f} {nbytes / med[('base', t)] / 1e9:9.1f}" if base else ""))
        out[NAMES[t]] = {"kernel_ms": kern * 1e3, "gb_per_s": nbytes / kern / 1e9, "x_floor": kern / floor,
                         "k16_per_row_ms": med[("k16", t)] / 16 * 1e3, "vs_fp32": fp32 / kern, "vs_int8": int8 / kern}
    return out


def run(rounds: int = 3, shapes: list[tuple[int, int]] | None = None) -> dict:
    """`make bench`'s section (bench/run.py): every shape, at the current thread count."""
    if gguf_kernels.build() is None:
        return {"error": f"the GGUF kernels are not available: {gguf_kernels.failure()}"}
    bandwidth = read_bandwidth(rounds)
    print(f"threads {torch.get_num_threads()}, read bandwidth (1 GiB torch sum) {bandwidth / 1e9:.1f} GB/s")
    return {"threads": torch.get_num_threads(), "read_gb_per_s": bandwidth / 1e9,
            **{f"{n}x{k}": bench_shape(n, k, rounds, bandwidth) for n, k in (shapes or SHAPES)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--shapes", default=None, help="e.g. 2048x2048,8192x2048")
    parser.add_argument("--types", default=None, help="e.g. Q6_K,Q5_0 (default: all)")
    parser.add_argument("--baseline", default=None, help="a git revision: time its gguf_kernels.cpp beside")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if gguf_kernels.build() is None:
        raise SystemExit(f"the GGUF kernels are not available: {gguf_kernels.failure()}")
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    bandwidth = read_bandwidth(args.rounds)
    print(f"threads {torch.get_num_threads()}, read bandwidth (1 GiB torch sum) {bandwidth / 1e9:.1f} GB/s; "
          f"x floor = kernel time / (weight bytes / bandwidth); vs = today's time / kernel time")
    base = baseline(args.baseline) if args.baseline else None
    only = set(args.types.split(",")) if args.types else None
    for n, k in shapes:
        bench_shape(n, k, args.rounds, bandwidth, base, only)


if __name__ == "__main__":
    main()
