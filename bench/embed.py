"""Embedding and search benchmark: llmos beside sentence-transformers, exact beside ANN.

    python -m bench.embed            # a few minutes on 2 cores; writes bench/results/embed-DATE.json

Measures, on the default embedding model (all-MiniLM-L6-v2, fp32):
- embedding throughput, sentences/s, batch 32, 432 real texts of mixed lengths and languages (license
  and README paragraphs and sentences, the multilingual check set): each llmos form (fp32, bf16, auto)
  and sentence-transformers on the same folder, rounds alternating, medians, with each form's min
  cosine to sentence-transformers' vectors;
- vector query latency p50/p95 over 100k chunks (synthetic unit vectors, 384 dims, clustered around
  2,000 random topics, stored in a real index file): exact matrix-product search vs the usearch HNSW graph, with the graph's build
  time and its recall@10 against exact;
- indexing throughput, chunks/s, of `Index.add` end to end (extract, chunk, embed, write) on Python's
  pydoc topics.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from llmos import store

RESULTS = Path(__file__).parent / "results"
N_SENTENCES, BATCH, ROUNDS = 432, 32, 5
N_CHUNKS, N_QUERIES = 100_000, 200


def mixed_texts(n: int = N_SENTENCES) -> list[str]:
    """`n` real texts of mixed lengths and languages: paragraphs and sentences of the shipped license
    and README corpora (a few words to past 256 tokens), then the multilingual check set."""
    import re
    from importlib import resources

    from llmos.tasks.embed import check_texts

    root = resources.files("llmos.data").joinpath("eval", "qa")
    pieces: list[str] = []
    for corpus in ("licenses", "readmes"):
        for f in sorted(root.joinpath(corpus).iterdir(), key=lambda f: f.name):
            for para in re.split(r"\n\s*\n", f.read_text(encoding="utf-8")):
                para = " ".join(para.split())
                if para:
                    pieces.append(para)
                    pieces.extend(s for s in re.split(r"(?<=[.!?])\s+", para)[1:2] if s)
    pieces = [p for p in check_texts() if p] + pieces
    return [pieces[(i * 7) % len(pieces)] for i in range(n)]  # spread over the corpora, deterministic


def embedding_throughput(path: Path, rounds: int = ROUNDS, forms: tuple[str, ...] = ("fp32", "bf16", "auto")) -> dict:
    """sentences/s of each llmos form and sentence-transformers (fp32) on the same texts and weights,
    rounds alternating (the machine is shared: medians of rounds, and ratios within the run), and
    each form's min cosine with sentence-transformers' vectors."""
    from sentence_transformers import SentenceTransformer

    from llmos.tasks.embed import Embedder

    ref = SentenceTransformer(str(path), device="cpu")
    texts = mixed_texts()
    ours = {form: Embedder.load(path, form) for form in forms}
    runs = {"sentence-transformers": lambda: ref.encode(texts, batch_size=BATCH)}
    runs.update({f"llmos {form}" + (f" ({e.form})" if form == "auto" else ""): (lambda e=e: e.embed(texts, batch_size=BATCH).vectors)
                 for form, e in ours.items()})
    reference = ref.encode(texts, batch_size=BATCH, normalize_embeddings=True)
    speeds: dict[str, list[float]] = {name: [] for name in runs}
    out: dict = {"texts": len(texts), "tokens": sum(min(ours["fp32"].count_tokens(t), 256) for t in texts), "forms": {}}
    for name, run in runs.items():  # warm-up; the vectors' agreement with the reference
        v = np.asarray(run(), dtype=np.float32)
        v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        out["forms"][name] = {"min_cosine": float((v * reference).sum(axis=1).min())}
    for _ in range(rounds):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            speeds[name].append(len(texts) / (time.perf_counter() - t0))
    base = statistics.median(speeds["sentence-transformers"])
    for name, s in speeds.items():
        out["forms"][name].update(sentences_per_s=statistics.median(s), ratio=statistics.median(s) / base, rounds=s)
    return out


def synthetic_vectors(rng: np.random.Generator, n: int, dim: int, topics: int = 2000, spread: float = 1.0) -> np.ndarray:
    """Random unit vectors around `topics` random centres (cosine to its centre ~0.7), as embeddings
    of real passages cluster by topic; uniformly random vectors in 384 dimensions have no neighbours
    to find, which no ANN (nor any search) is built for."""
    centres = rng.standard_normal((topics, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    v = centres[rng.integers(0, topics, n)] + spread * rng.standard_normal((n, dim)).astype(np.float32) / np.sqrt(dim)
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def query_latency(embedder, folder: Path) -> dict:
    """p50/p95 ms of vector search over N_CHUNKS stored chunks, exact vs ANN."""
    from llmos.tasks.index import Index

    rng = np.random.default_rng(0)
    vectors = synthetic_vectors(rng, N_CHUNKS, embedder.dim)
    index = Index(folder / "latency.sqlite", embedder)
    db = index.db._db  # bulk-load synthetic rows directly: the benchmark is about search, not ingestion
    db.execute("BEGIN")
    db.executemany("INSERT INTO meta(key, value) VALUES (?, ?)",
                   [("embed_model", embedder.name), ("embed_fingerprint", embedder.fingerprint), ("dim", str(embedder.dim))])
    per_doc = 1000
    for d in range(N_CHUNKS // per_doc):
        doc_id = db.execute("INSERT INTO documents(path, kind, sha256, size, n_chunks, split_blocks, indexed_at)"
                            " VALUES (?, 'text', '', 0, ?, 0, 0)", (f"/synthetic/{d}.txt", per_doc)).lastrowid
        for c in range(per_doc):
            i = d * per_doc + c
            cid = db.execute("INSERT INTO chunks(doc_id, ord, text, heading, char_start, char_end, line_start, line_end, n_tokens)"
                             " VALUES (?, ?, ?, '[]', 0, 0, 1, 1, 0)", (doc_id, c, f"chunk {i}")).lastrowid
            db.execute("INSERT INTO vectors(chunk_id, vector) VALUES (?, ?)", (cid, vectors[i].tobytes()))
    db.execute("UPDATE meta SET value = '1' WHERE key = 'generation'")
    db.execute("COMMIT")
    queries = synthetic_vectors(rng, N_QUERIES, embedder.dim)
    index.db.vectors()  # load the matrix once, as a long-running process would
    t0 = time.perf_counter()
    index._synced_graph()  # built from the database, streaming, as on first use
    build_s = time.perf_counter() - t0
    out = {"chunks": N_CHUNKS, "ann_build_s": build_s, "ann_recall_at_10": index.ann_recall(n_queries=200)}
    for name, use_ann in (("exact", False), ("ann", True)):
        times = []
        for q in queries:
            t0 = time.perf_counter()
            index._vector_candidates(q, 10, use_ann)
            times.append((time.perf_counter() - t0) * 1000)
        times.sort()
        out[f"{name}_p50_ms"] = statistics.median(times)
        out[f"{name}_p95_ms"] = times[int(0.95 * len(times)) - 1]
    index.close()
    return out


def indexing_throughput(embedder, folder: Path, n_topics: int = 24) -> dict:
    from llmos.tasks.evaluate_retrieval import write_pydoc_corpus
    from llmos.tasks.index import Index

    corpus = write_pydoc_corpus(folder / "pydoc")
    keep = sorted(corpus.glob("*.txt"))[:n_topics]
    index = Index(folder / "ingest.sqlite", embedder)
    t0 = time.perf_counter()
    report = index.add(keep)
    elapsed = time.perf_counter() - t0
    index.close()
    return {"documents": len(report.added), "chunks": report.embedded, "seconds": elapsed,
            "chunks_per_s": report.embedded / elapsed}


SECTIONS = ("embedding", "latency", "indexing")


def run(sections: tuple[str, ...] = SECTIONS, threads: int | None = None) -> dict:
    from llmos.tasks.embed import Embedder

    if threads:
        torch.set_num_threads(threads)
    path = store.pull(store.DEFAULT_EMBED_MODEL, quiet=True)
    result: dict = {"date": date.today().isoformat(),
                    "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                                "python": sys.version.split()[0], "torch": torch.__version__}}
    with tempfile.TemporaryDirectory() as tmp:
        if "embedding" in sections:
            result["embedding"] = embedding_throughput(path)
        embedder = Embedder.load(path, "auto") if {"latency", "indexing"} & set(sections) else None
        if "latency" in sections:
            result["latency"] = query_latency(embedder, Path(tmp))
        if "indexing" in sections:
            result["indexing"] = indexing_throughput(embedder, Path(tmp))
    return result


def table(r: dict) -> str:
    rows = [f"{'metric':<48}{'llmos':>12}{'reference':>14}{'ratio':>9}"]
    if "embedding" in r:
        e = r["embedding"]
        ref = e["forms"]["sentence-transformers"]
        rows.append(f"embeddings, {e['texts']} texts of mixed lengths ({e['tokens']} tokens), batch {BATCH}, "
                    f"{r['machine']['threads']} threads; reference: sentence-transformers fp32")
        for name, f in e["forms"].items():
            if name != "sentence-transformers":
                rows.append(f"{'  ' + name + ' sentences/s':<48}{f['sentences_per_s']:>12.1f}{ref['sentences_per_s']:>14.1f}"
                            f"{f['ratio']:>8.2f}x   min cosine {f['min_cosine']:.5f}")
    if "latency" in r:
        lat = r["latency"]
        rows += [
            f"{'query p50 ms, 100k chunks (ANN vs exact)':<48}{lat['ann_p50_ms']:>12.2f}{lat['exact_p50_ms']:>14.2f}"
            f"{lat['exact_p50_ms'] / lat['ann_p50_ms']:>8.2f}x   (reference: exact)",
            f"{'query p95 ms, 100k chunks (ANN vs exact)':<48}{lat['ann_p95_ms']:>12.2f}{lat['exact_p95_ms']:>14.2f}"
            f"{lat['exact_p95_ms'] / lat['ann_p95_ms']:>8.2f}x",
            f"{'ANN recall@10 vs exact / build seconds':<48}{lat['ann_recall_at_10']:>12.3f}{lat['ann_build_s']:>14.1f}",
        ]
    if "indexing" in r:
        ix = r["indexing"]
        rows.append(f"{'indexing chunks/s (Index.add, pydoc topics)':<48}{ix['chunks_per_s']:>12.1f}"
                    f"{'':>14}         ({ix['chunks']} chunks in {ix['seconds']:.1f} s)")
    return "\n".join(rows)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=SECTIONS, action="append", help="run only this section (repeatable)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    result = run(tuple(args.only or SECTIONS), args.threads)
    print(table(result))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"embed-{result['date']}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwritten to {out}")
