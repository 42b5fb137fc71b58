"""Vector search at scale: exact scan vs the usearch HNSW graph over N synthetic chunk vectors.

    python -m bench.search --n 1000000     # the issue's scale (the HNSW build takes long on 2 cores)
    python -m bench.search --n 200000

Embedding a million real chunks is out of reach on 2 cores (~20-40 chunks/s: days), so the vectors
are synthetic: unit vectors clustered around random topics as real embeddings cluster
(bench/embed.py's `synthetic_vectors`). Printed: the HNSW build time (added in batches, as an index
grows), query p50/p99 of the exact fp32 scan and of HNSW (vector part only: query embedding, FTS5,
fusion and reading the passages are not in these numbers), ANN recall@10 against exact, and the
graph's size on disk.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.embed import synthetic_vectors
from llmos.tasks.index import exact_search


def percentile(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


# `make bench` indexes this many (~3 minutes of building here); `python -m bench.search --n 1000000` is the scale.
BENCH_N = 100_000


def run(n: int = BENCH_N, dim: int = 384, queries: int = 200, batch: int = 50_000) -> dict:
    from usearch.index import Index as USearchIndex

    rng = np.random.default_rng(0)
    # Queries come from the same topics as the chunks (held out of the index): a query about nothing
    # stored has no true neighbours to find.
    everything = synthetic_vectors(rng, n + queries, dim, topics=max(2000, n // 500))
    vectors, qs = everything[:n], everything[n:]
    ids = np.arange(n, dtype=np.int64)
    index = USearchIndex(ndim=dim, metric="ip", dtype="f32", connectivity=16, expansion_add=128, expansion_search=128)
    t0 = time.perf_counter()
    for start in range(0, n, batch):  # incremental, as `index add` grows it
        index.add(ids[start:start + batch], vectors[start:start + batch])
    build_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "g.usearch"
        index.save(str(file))
        size_mb = file.stat().st_size / 2**20
    exact_ms, ann_ms, recalls = [], [], []
    for q in qs:
        t0 = time.perf_counter()
        exact = exact_search(vectors, ids, q[None], 10)[0]
        exact_ms.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        found = index.search(q, 10)
        ann_ms.append((time.perf_counter() - t0) * 1000)
        recalls.append(len({c for c, _ in exact} & {int(k) for k in found.keys}) / 10)
    return {"n": n, "build_s": build_s, "graph_mb": size_mb, "vectors_mb": vectors.nbytes / 2**20,
            "exact_p50_ms": statistics.median(exact_ms), "exact_p99_ms": percentile(exact_ms, 0.99),
            "ann_p50_ms": statistics.median(ann_ms), "ann_p99_ms": percentile(ann_ms, 0.99),
            "recall_at_10": float(np.mean(recalls))}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1_000_000)
    args = parser.parse_args()
    r = run(args.n)
    print(f"{r['n']:,} vectors x 384: HNSW built in {r['build_s']:.0f} s (batches of 50k), graph {r['graph_mb']:.0f} MB "
          f"on disk (+ {r['vectors_mb']:.0f} MB of fp32 vectors in the database)")
    print(f"  exact scan  p50 {r['exact_p50_ms']:.1f} ms  p99 {r['exact_p99_ms']:.1f} ms")
    print(f"  HNSW        p50 {r['ann_p50_ms']:.2f} ms  p99 {r['ann_p99_ms']:.2f} ms  recall@10 vs exact {r['recall_at_10']:.3f}")
