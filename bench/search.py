"""Search at scale through the real Index API: N generated chunks added, then queries end to end.

    python -m bench.search --chunks 1000000    # the issue's scale
    python -m bench.search --chunks 100000     # what `make bench` runs (BENCH_CHUNKS; ~5 minutes here)

What is real: documents written as .txt files and added with `Index.add` in batches of files (reading,
chunking with MiniLM's tokenizer, SQLite + FTS5 writes, one transaction per document, the HNSW
graph kept incrementally: tasks/ann.py), and every query: `Index.search(q, k=10, mode="hybrid")`,
which embeds the query with the real MiniLM model, asks the graph, reranks, runs FTS5, fuses and
reads the passages. What is not: embedding a million chunks with MiniLM would take days on 2 cores
(~40-60 chunks/s), so chunk vectors come from a pool of real ones: each paragraph is "Entry D-P."
and six sentences drawn from the standard library's docstrings (~13k distinct sentences: real,
varied English for FTS5), and its vector is made from the MiniLM vectors of pydoc topic sentences
chosen by the seed (D, P) from a pool of ~1,300 (`paragraph_vector`, `PoolEmbedder`): spread as real
passages' vectors are (mean pairwise cosine ~0.14), but not of the paragraph's own words. Queries are 200 held-out pydoc
sentences, in no chunk, embedded by MiniLM at query time.

Printed: build time and chunks/s, peak RSS as the collection grows (it should stay flat), index size
on disk (database and graph), query p50/p99 end to end and the parts of it (query embedding, graph +
rerank, FTS5, fusion and reading the passages), and the ANN's recall@10 against exact search (exact streams
the whole vector table), on the held-out queries and on `Index.ann_recall`'s.

Measured 2026-12-06, 300,203 chunks, 1 thread, 2-core machine shared with other work (load ~2-4):
built in 621 s (483 chunks/s); database 1,156 MB + graph 189 MB; RSS after each add ~430 MB from
113k chunks on (423 MB at 300k, after a segment sealed at 262k), the add's peak 611 MB; query end to end p50 280 ms, p99 507 ms,
of which FTS5 257/495 ms (a typical query's OR terms match 81% of these chunks, ranked at ~1 us a
row; counting them alone takes 23 ms), query embedding 17/24, graph + rerank 4.9/7.6, fusion and
passages 0.5/2.3; recall@10 0.988 (queries) and 0.988 (between stored vectors).

Measured 2026-12-06, 1,000,167 chunks, 1 thread, shared machine (load ~1-2): built in 1,824 s (548
chunks/s; `--build-only`, then `--reuse` for the queries); database 3,844 MB + graph 630 MB; add peak
RSS 610 MB. Keyword list (bounded, tasks/bm25.py) 24.9/106.7 ms p50/p99 against FTS5's full query
905/1,967 ms, top-10 agreement 0.976 (top 50: 0.880), proven exact on 0 of 100 queries (the budget
path on all); hybrid end to end p50 78.5 / p99 285 ms (the same 40 queries alternating: 117/357 ms
against 1,016/1,930 ms with FTS5's full query); recall@10 0.992 (queries), 0.996 (between vectors).
The vector part (graph + rerank) was 122/1,977 ms p50/p99 in the profile, where each query also ran
FTS5's full query (which reads hundreds of MB of the database and evicts the vector pages). Without
it (a second locked run, load ~1.4): first query 2.4 s; end to end p50 75.1 / p99 215 ms over the
first 200 queries of a process (rowid lists read cold), 45.9 / 101 ms over them again (warm); parts
p50/p99: embed 17.1/27.9, graph 6.0/12.6, rerank 1.8/3.9, keyword 21.8/33.9, fusion + passages 0.5/0.8.

Measured 2026-12-06 later, the same 1M index (`--reuse --threads 2`, machine shared with other work),
with the query embedded and the graph probed on a worker thread beside the keyword side (the encoder
now releases the GIL): warm p50 27.6 / p99 57.5 ms; first pass p50 45.5 / p99 120 ms; first query
994 ms; recall@10 0.992. The queries now run at `--threads` (default: llmos's choice), not always 1.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

BENCH_CHUNKS = 100_000  # `make bench`; the scale is `python -m bench.search --chunks 1000000`
PARAGRAPHS_PER_FILE = 500
FILES_PER_ADD = 100  # 50k chunks per `Index.add` call
SENTENCES_PER_PARAGRAPH = 6  # ~150 tokens: one paragraph, one chunk (two exceed MiniLM's 256)
N_QUERIES = 200
OLD_QUERIES = 40  # of them also timed end to end with FTS5's full keyword query (~1 s a query at 1M chunks)
CLI_QUERIES = 5  # of them run as `llmos search` in a new process each
KEYWORD_QUERIES = 100  # of them profiled by part, the keyword list beside FTS5's full bm25 ranking
_TAG = re.compile(r"Entry (\d+)-(\d+)\.")


def percentile(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


def _sentences(text: str) -> list[str]:
    found = (s.strip() for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", re.sub(r"\s+", " ", text)))
    return [s for s in found if 40 < len(s) < 220 and "Entry" not in s]


def pool_sentences() -> list[str]:
    """Distinct English sentences of Python's pydoc topics (~1,500): embedded with MiniLM."""
    from pydoc_data.topics import topics

    return list(dict.fromkeys(_sentences(" ".join(topics[k] for k in sorted(topics)))))


def text_sentences(exclude: set[str]) -> list[str]:
    """Distinct sentences of the standard library's docstrings (~13,000, ~10k words) for the chunks'
    text: with the pool's 1,300 sentences alone every word was in a large share of the chunks (one
    query term in 73% of them at 50k), which no real collection looks like and FTS5 pays for."""
    import ast
    import sysconfig

    found: dict[str, None] = {}
    for file in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if "test" in file.parts or "tests" in file.parts or "site-packages" in file.parts:
            continue
        try:
            tree = ast.parse(file.read_text(errors="ignore"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                found.update(dict.fromkeys(s for s in _sentences(ast.get_docstring(node) or "") if s not in exclude))
    return list(found)


NOISE = 1.0  # norm of the random part of a paragraph's vector, against its topic's 1 (see paragraph_vector)


def paragraph_vector(doc: int, paragraph: int, pool: np.ndarray) -> np.ndarray:
    """Paragraph (doc, paragraph)'s vector: a pool sentence's (its topic), 0.3 of another's, and
    random noise of norm NOISE. Real passages' MiniLM vectors have a mean pairwise cosine of 0.14
    (400 stdlib docstrings), the pool sentences' 0.19; these come out at ~0.14. (A sum of six pool
    vectors came out at 0.59: far more crowded than any real collection, which HNSW pays for.)"""
    rng = np.random.default_rng([doc, paragraph])
    a, b = rng.choice(len(pool), 2, replace=False)
    noise = rng.standard_normal(pool.shape[1]).astype(np.float32)
    return pool[a] + 0.3 * pool[b] + NOISE * noise / np.linalg.norm(noise)


class PoolEmbedder:
    """The real MiniLM embedder for queries and token counts; chunk vectors from the pool's real
    vectors, by the "Entry D-P." tags in the chunk's text (see the module docstring)."""

    def __init__(self, embedder, pool: list[str]) -> None:
        self.real = embedder
        self.name, self.fingerprint, self.dim = embedder.name, embedder.fingerprint, embedder.dim
        self.max_tokens, self.path = embedder.max_tokens, embedder.path
        self.count_tokens = embedder.count_tokens
        self.embed_query = embedder.embed_query
        self.pool_vectors = embedder.embed(pool, batch_size=64).vectors.astype(np.float32)  # (P, D)

    @property
    def native(self) -> bool | None:  # the query embedding's forward runs without the GIL (Index.search)
        return self.real.native

    def embed(self, texts: list[str], batch_size: int = 32):
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            tags = _TAG.findall(text)
            if not tags:  # the tail of a paragraph split for length: a seed from its text
                seed = zlib.crc32(text.encode())
                tags = [(seed, seed)]
            for d, p in tags:
                out[i] += paragraph_vector(int(d), int(p), self.pool_vectors)

        class Out:
            truncated: list[int] = []
            vectors = out
        return Out()


def write_files(folder: Path, first_doc: int, n_docs: int, corpus: list[str]) -> list[Path]:
    files = []
    for d in range(first_doc, first_doc + n_docs):
        rng = np.random.default_rng([d, 1 << 20])
        picks = rng.integers(0, len(corpus), (PARAGRAPHS_PER_FILE, SENTENCES_PER_PARAGRAPH))
        paragraphs = (f"Entry {d}-{p}. " + " ".join(corpus[i] for i in picks[p]) for p in range(PARAGRAPHS_PER_FILE))
        path = folder / f"doc{d:06d}.txt"
        path.write_text("\n\n".join(paragraphs) + "\n")
        files.append(path)
    return files


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident set size of this process in MB; the peak since `reset_peak`."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024


def reset_peak() -> None:
    """Start the peak RSS afresh (Linux: "5" to clear_refs resets VmHWM), so the add's peak is its own,
    not the model loading's or the pool embedding's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def cli_queries(path: Path, queries: list[str]) -> list[float]:
    """Wall seconds of `llmos search QUERY --index PATH`, each in a new process, as a user runs it
    (at llmos's own choice of threads)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = []
    for q in queries:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "llmos", "search", q, "--index", str(path), "-k", "10"], env=env,
                       check=True, stdout=subprocess.DEVNULL)
        out.append(time.perf_counter() - t0)
    return out


def disk_mb(path: Path) -> dict[str, float]:
    """The database (with its write-ahead log and the keyword search's kept row lengths) and the graph."""
    database = sum(p.stat().st_size for p in (path, Path(f"{path}-wal"), Path(f"{path}.bm25")) if p.exists())
    graph = Path(f"{path}.usearch")
    graph_size = sum(p.stat().st_size for p in graph.iterdir()) if graph.is_dir() else 0
    return {"database_mb": database / 2**20, "graph_mb": graph_size / 2**20}


def run(chunks: int = BENCH_CHUNKS, folder: Path | None = None, verbose: bool = True, *, reuse: bool = False,
        build_only: bool = False, threads: int = 0) -> dict:
    """Build (or, with `reuse`, reopen and top up to `chunks`) the index in `folder`, then time queries
    (none with `build_only`). A kept folder lets the queries be timed again without the long build."""
    import torch

    from llmos import store
    from llmos.tasks.embed import Embedder
    from llmos.tasks import index_db
    from llmos.tasks.index import Index, fuse
    from llmos.threads import auto_threads

    threads = threads or auto_threads()
    torch.set_num_threads(threads)
    bounded_rows = index_db.BOUNDED_ROWS
    say = print if verbose else (lambda *a, **k: None)
    scratch = Path(folder) if folder is not None else Path(tempfile.mkdtemp(prefix="llmos-bench-search-"))
    scratch.mkdir(parents=True, exist_ok=True)
    sentences = pool_sentences()
    pool, queries = sentences[:-N_QUERIES], sentences[-N_QUERIES:]
    corpus = text_sentences(set(queries))
    t0 = time.perf_counter()
    embedder = PoolEmbedder(Embedder.load(store.pull(store.DEFAULT_EMBED_MODEL, quiet=True), "auto"), pool)  # as Index loads it
    say(f"pool: {len(pool)} sentences embedded with MiniLM in {time.perf_counter() - t0:.0f} s; "
        f"{len(queries)} held out as queries; chunk text from {len(corpus):,} docstring sentences")
    path = scratch / "scale.sqlite"
    if not reuse:
        for stale in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            stale.unlink(missing_ok=True)
        shutil.rmtree(Path(f"{path}.usearch"), ignore_errors=True)
    docs = scratch / "docs"
    docs.mkdir(exist_ok=True)
    index = Index(path, embedder)
    rss_start = rss_mb()[0]
    reset_peak()
    growth = []
    # Reused: go on from the documents already there (each file is one document, numbered in order).
    built, doc, build_s = len(index), len(index.db.documents()), 0.0
    reused = built
    if built:
        say(f"reusing {path}: {built:,} chunks in {doc:,} documents")
    while built < chunks:
        n_docs = min(FILES_PER_ADD, -(-(chunks - built) // PARAGRAPHS_PER_FILE))
        files = write_files(docs, doc, n_docs, corpus)
        t0 = time.perf_counter()
        report = index.add(files)
        build_s += time.perf_counter() - t0
        for f in files:  # the text lives on in the index; keep the scratch disk small
            f.unlink()
        doc += n_docs
        built += report.embedded
        current, peak = rss_mb()
        growth.append({"chunks": built, "seconds": build_s, "rss_mb": current, "peak_rss_mb": peak})
        say(f"  {built:>9,} chunks  {build_s:7.0f} s  {(built - reused) / build_s:6.0f} chunks/s  "
            f"RSS {current:5.0f} MB  peak {peak:5.0f} MB")
    add_peak = rss_mb()[1]
    index.close()
    sizes = disk_mb(path)
    build = {"chunks": built, "build_s": build_s, "chunks_per_s": (built - reused) / build_s if build_s else None,
             "rss_before_add_mb": rss_start, "add_peak_rss_mb": add_peak, "growth": growth, **sizes}
    if build_s:
        say(f"{built - reused:,} chunks added in {build_s:.0f} s ({(built - reused) / build_s:.0f} chunks/s; pool-made vectors, "
            f"real chunking, SQLite, FTS5 and HNSW); peak RSS {add_peak:.0f} MB (the process held {rss_start:.0f} MB before adding)")
    say(f"  on disk: database {sizes['database_mb']:,.0f} MB, HNSW graph {sizes['graph_mb']:,.0f} MB")
    if build_only:
        return build

    cli = cli_queries(path, queries[:CLI_QUERIES])
    say(f"  `llmos search` from a shell (a new process each: imports, model, index, first query), "
        f"{len(cli)} queries: median {statistics.median(cli):.2f} s, max {max(cli):.2f} s")

    # Queries, as a fresh process would run them after opening the index.
    index = Index(path, embedder)
    t0 = time.perf_counter()
    index.search("how is an exception raised", k=10)  # opens the graph (memory maps) and the database
    first_ms = (time.perf_counter() - t0) * 1000
    total, total_old, total_same = [], [], []  # end to end; with FTS5's full keyword query; new, on the same queries
    for i, q in enumerate(queries):
        rounds = [False, True] if i < OLD_QUERIES else [False]
        for old in (rounds if i % 2 else rounds[::-1]):  # alternate which goes first
            index._query_vectors.clear()  # each timed search embeds its query
            index_db.BOUNDED_ROWS = 1 << 62 if old else bounded_rows
            t0 = time.perf_counter()
            results = index.search(q, k=10, mode="hybrid")
            ms = (time.perf_counter() - t0) * 1000
            (total_old if old else total).append(ms)
            if not old and len(rounds) == 2:
                total_same.append(ms)
            assert len(results) == 10
    index_db.BOUNDED_ROWS = bounded_rows
    warm = []  # every query again, as a process that has answered a few hundred already answers them
    for q in queries:
        index._query_vectors.clear()
        t0 = time.perf_counter()
        index.search(q, k=10, mode="hybrid")
        warm.append((time.perf_counter() - t0) * 1000)
    parts = {"embed": [], "vector": [], "keyword": [], "fuse+passages": [], "keyword, FTS5 full": []}
    agree10, agree50, proven, postings, scored = [], [], 0, [], []
    for i, q in enumerate(queries[:KEYWORD_QUERIES]):  # the steps one at a time, for the profile; bounded vs FTS5
        t = [time.perf_counter()]
        qvec = index.embedder.embed_query(q)
        qvec = (qvec / np.linalg.norm(qvec)).astype(np.float32)
        t.append(time.perf_counter())
        vec = index._vector_candidates(qvec, 50, None)
        t.append(time.perf_counter())
        if i % 2:
            t0 = time.perf_counter()
            full = index.db.keyword_ranked(q, 50, bounded=False).rows
            full_ms = (time.perf_counter() - t0) * 1000
        t.append(time.perf_counter())
        ranked = index.db.keyword_ranked(q, 50, bounded=True)
        t.append(time.perf_counter())
        index._results(fuse(vec, ranked.rows)[:10], qvec)
        t.append(time.perf_counter())
        if not i % 2:
            t0 = time.perf_counter()
            full = index.db.keyword_ranked(q, 50, bounded=False).rows
            full_ms = (time.perf_counter() - t0) * 1000
        t = t[:2] + t[3:]  # drop the FTS5 query's slot
        for name, a, b in zip(parts, t, t[1:]):
            parts[name].append((b - a) * 1000)
        parts["keyword, FTS5 full"].append(full_ms)
        ids = [c for c, _ in ranked.rows]
        agree10.append(len(set(ids[:10]) & {c for c, _ in full[:10]}) / max(1, min(10, len(full))))
        agree50.append(len(set(ids) & {c for c, _ in full}) / max(1, len(full)))
        proven += ranked.exact
        postings.append(ranked.postings)
        scored.append(ranked.scored)
    qvecs = np.stack([v / np.linalg.norm(v) for v in (index.embedder.embed_query(q) for q in queries)]).astype(np.float32)
    t0 = time.perf_counter()
    exact = index._exact_search(qvecs, 10)
    exact_s = time.perf_counter() - t0
    approx = index._ann_search(qvecs, 10)
    recall_queries = float(np.mean([len({c for c, _ in e} & {c for c, _ in a}) / 10 for e, a in zip(exact, approx)]))
    recall_between = index.ann_recall(n_queries=200)
    index.close()
    out = {
        **build,
        "threads": threads, "embedding_beside_keyword": index._beside(),
        "first_query_ms": first_ms, "cli_search_s": cli, "query_p50_ms": statistics.median(total), "query_p99_ms": percentile(total, 0.99),
        "warm_query_p50_ms": statistics.median(warm), "warm_query_p99_ms": percentile(warm, 0.99),
        "old_query_p50_ms": statistics.median(total_old), "old_query_p99_ms": percentile(total_old, 0.99),
        "same_queries_p50_ms": statistics.median(total_same), "same_queries_p99_ms": percentile(total_same, 0.99),
        "keyword_top10_agreement": statistics.mean(agree10), "keyword_top50_agreement": statistics.mean(agree50),
        "keyword_proven_exact": proven, "keyword_queries": len(agree10),
        "keyword_postings_p50": statistics.median(postings), "keyword_postings_max": max(postings),
        "keyword_scored_p50": statistics.median(scored), "keyword_scored_max": max(scored),
        **{f"{name}_p50_ms": statistics.median(v) for name, v in parts.items()},
        **{f"{name}_p99_ms": percentile(v, 0.99) for name, v in parts.items()},
        "exact_scan_s_200_queries": exact_s,
        "recall_at_10_queries": recall_queries, "recall_at_10_between_vectors": recall_between,
    }
    say(f"  query end to end (hybrid, k=10, {len(queries)} held-out queries): p50 {out['query_p50_ms']:.1f} ms  "
        f"p99 {out['query_p99_ms']:.1f} ms  (first query after opening: {first_ms:.0f} ms)")
    say(f"    warm (every query again): p50 {out['warm_query_p50_ms']:.1f} ms  p99 {out['warm_query_p99_ms']:.1f} ms; "
        f"{threads} threads, query embedding {'beside' if out['embedding_beside_keyword'] else 'before'} the keyword side")
    say(f"    the same {len(total_old)} queries, alternating: p50 {out['same_queries_p50_ms']:.1f} / p99 {out['same_queries_p99_ms']:.1f} ms "
        f"against p50 {out['old_query_p50_ms']:.1f} / p99 {out['old_query_p99_ms']:.1f} ms with FTS5's full keyword query")
    say(f"  keyword list (top 50, bounded, tasks/bm25.py) vs FTS5's full bm25 ranking, {len(agree10)} queries: top-10 agreement "
        f"{out['keyword_top10_agreement']:.3f}, top-50 {out['keyword_top50_agreement']:.3f}; proven exact {proven}, "
        f"budget reached {len(agree10) - proven}; postings read p50 {out['keyword_postings_p50']:,.0f} (max "
        f"{out['keyword_postings_max']:,}), rows scored p50 {out['keyword_scored_p50']:,.0f} (max {out['keyword_scored_max']:,})")
    say("    parts, p50/p99 ms: " + ", ".join(f"{n} {out[n + '_p50_ms']:.1f}/{out[n + '_p99_ms']:.1f}" for n in parts))
    say(f"  ANN recall@10 vs exact: {recall_queries:.3f} on the queries, {recall_between:.3f} on Index.ann_recall's "
        f"(exact search streams the table: {exact_s:.1f} s for {len(queries)} queries)")
    if folder is None:
        shutil.rmtree(scratch, ignore_errors=True)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=1_000_000)
    parser.add_argument("--folder", type=Path, default=None, help="scratch folder to keep the index in (default: a temporary one)")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse the index kept in --folder, adding only what is missing up to --chunks")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: llmos's choice, auto_threads)")
    parser.add_argument("--build-only", action="store_true", help="build (or top up) the index, time no queries")
    args = parser.parse_args()
    if args.reuse and args.folder is None:
        parser.error("--reuse needs --folder")
    run(args.chunks, args.folder, reuse=args.reuse, build_only=args.build_only, threads=args.threads)
