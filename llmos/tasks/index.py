"""A search index over your documents: one SQLite file of documents, chunks, vectors and hashes.

    index = Index("notes.sqlite")                  # created on first use; default: $LLMOS_HOME/indexes/default.sqlite
    index.add(["~/notes", "manual.pdf"])           # extracts, chunks, embeds; re-running adds only what changed
    index.search("how do I rotate the api key", k=5, mode="hybrid")   # -> [SearchResult]
    index.remove(["~/notes/old.md"]); index.stats(); index.documents()

Storage is `IndexDB` (tasks/index_db.py: every SQL statement), SQLite in WAL mode with
`synchronous=FULL`. Each document is written (its row, chunks, full-text entries and vectors,
replacing any older version) in one transaction of its own, so a crash
or `kill -9` in the middle of `add` leaves every completed document present and none half-written;
the next `add` skips what is there (same sha256) and does the rest. Adding a folder again also drops
documents that were deleted from it.

The index records the embedding model (name, fingerprint, dimension) with its first document and
refuses to mix in vectors from another model. Search modes:

- "vector": cosine similarity, exactly (a matrix product over all vectors) until the collection has
  `ann_threshold` chunks, then approximately with the HNSW graph kept beside the file (`PATH.usearch/`,
  tasks/ann.py): its candidates are reranked by their exact vectors. `add` and `remove` apply each
  committed document to the graph and save it once at the end (or as a segment fills); a graph
  behind the database (a crash between the two, another process's writes) is healed from it,
  streaming, on next use. No operation reads every vector into memory past the threshold;
- "keyword": SQLite FTS5 BM25 (Porter stemming) over the chunks' text and heading paths;
- "hybrid" (default): both lists fused by weighted reciprocal-rank fusion (`fuse`: k=10, the vector
  list weighted 0.5 against the keyword list's 1, as tuned on the development sets).

`stats(check_ann=True)` reports the ANN's recall@10 against exact search on sampled queries.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import hashlib
import itertools
import json
import os
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from llmos import store
from llmos.errors import LlmosError
from llmos.tasks import ann, ingest
from llmos.tasks.ann import AnnGraph
from llmos.tasks.index_db import DocumentInfo, EmbedModel, IndexDB, Written
from llmos.threads import auto_threads

MODES = ("vector", "keyword", "hybrid")
DEFAULT_ANN_THRESHOLD = 50_000  # exact search over 50k x 384 takes ~10 ms here; past it, ANN pays
# The fusion, tuned on the shipped development sets (`llmos eval retrieval --tune`: pydoc topics x2,
# licenses, READMEs; passage-level relevance). Mean MRR 0.835 at the textbook k=60 with equal weights,
# 0.875 here, better on each set; the settings around it (k 5-15, weight 0.3-0.5) score 0.873-0.878.
RRF_K = 10
VECTOR_WEIGHT = 0.5  # the vector list's weight in the fusion; the keyword list's is 1
STREAM_BATCH = 256  # chunks of a large document packed, embedded and inserted at a time (bounds add()'s memory)
# The graph proposes this many candidates per result wanted (at least ANN_MIN_CANDIDATES), reranked
# by their exact vectors: 40 for 10 gave recall@10 1.0 over int8 distances' 0.93 (tasks/ann.py).
ANN_CANDIDATES = 4
ANN_MIN_CANDIDATES = 40
def default_index_path() -> Path:
    return store.home() / "indexes" / "default.sqlite"


@dataclass(frozen=True)
class SearchResult:
    """One retrieved passage. `score` ranks within a mode (cosine, -BM25 or RRF); `similarity` is
    the cosine with the query when vectors were consulted (vector and hybrid modes), else None."""

    rank: int
    score: float
    similarity: float | None
    path: str
    text: str
    heading: tuple[str, ...]
    line_start: int
    line_end: int
    char_start: int
    char_end: int
    page: int | None
    chunk_id: int

    @property
    def location(self) -> str:
        """`path:12-20`, or `path p.3` for a PDF page."""
        return format_location(self.path, self.page, self.line_start, self.line_end)


def format_location(path: str, page: int | None, line_start: int, line_end: int) -> str:
    """`path:12-20` (`path:12` for one line), or `path p.3` for a PDF page."""
    if page is not None:
        return f"{path} p.{page}"
    return f"{path}:{line_start}" if line_start == line_end else f"{path}:{line_start}-{line_end}"


@dataclass
class AddReport:
    """What `Index.add` did. `embedded`: chunks embedded in this run (0 when nothing changed)."""

    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)  # deleted from disk under a folder that was added
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    skipped: int = 0  # files of unsupported types inside added folders
    embedded: int = 0
    split_blocks: int = 0  # paragraphs too long for one chunk, split at sentence/word boundaries


@dataclass
class _Prepared:
    """A file read, with its first chunks; `rest` holds the others, in batches still to be packed
    (None: the document fits in `chunks`), so a large file is embedded and written batch by batch."""

    path: Path
    sha256: str
    size: int
    kind: str
    chunks: list[ingest.Chunk]
    rest: Iterator[Any] | None
    counts: dict[str, int]  # split_blocks, as the chunker counts them
    update: bool  # an older version is in the index
    n_chars: int = 1  # of the extracted text: progress is shown in bytes by how far into it a chunk ends


class _Pipeline:
    """Reading, extracting and chunking on a thread of its own, ahead of the embedding.

    Iterating yields ("unchanged", path, None), ("failed", path, reason) or ("document", path,
    _Prepared) in file order. A large document's `rest` is an iterator over the batches of
    STREAM_BATCH chunks the reader thread packs meanwhile; a chunking error mid-document comes out
    of it as an LlmosError (its transaction then rolls back). The queue holds at most QUEUE_DEPTH
    items, so memory stays bounded however far the reader could run ahead. Leaving the `with` block
    early (an error, Ctrl-C) stops the thread before the exception goes on.

    The tokenizers library releases the GIL while it counts a chunk's tokens, and PyTorch while it
    multiplies, so the two threads share the cores."""

    QUEUE_DEPTH = 4
    _END = object()

    def __init__(self, index: Index, files: list[Path], recorded: dict[Path, str | None], embedder: Any,
                 batch_size: int) -> None:
        self._queue: queue.Queue = queue.Queue(self.QUEUE_DEPTH)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(index, files, recorded, embedder, batch_size),
                                        name="llmos-index-reader", daemon=True)

    def __enter__(self) -> _Pipeline:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        while self._thread.is_alive():  # unblock a reader waiting on a full queue
            with contextlib.suppress(queue.Empty):
                self._queue.get(timeout=0.05)
        self._thread.join()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            with contextlib.suppress(queue.Full):
                self._queue.put(item, timeout=0.1)
                return True
        return False

    def _read(self, index: Index, files: list[Path], recorded: dict[Path, str | None], embedder: Any,
              batch_size: int) -> None:
        try:
            for file in files:
                try:
                    prepared = index._prepare(file, recorded.get(file), embedder, batch_size)
                except LlmosError as exc:
                    if not self._put(("failed", file, str(exc).removeprefix(f"{file}: "))):
                        return
                    continue
                except OSError as exc:  # gone or unreadable since it was listed
                    if not self._put(("failed", file, str(exc))):
                        return
                    continue
                if prepared is None:
                    if not self._put(("unchanged", file, None)):
                        return
                    continue
                if prepared.rest is None:
                    if not self._put(("document", file, prepared)):
                        return
                    continue
                chunks, batches, abandoned = prepared.rest, queue.Queue(self.QUEUE_DEPTH), threading.Event()
                prepared.rest = self._drain(batches, abandoned)
                if not self._put(("document", file, prepared)):
                    return
                # The rest of this document goes through its own queue, read inside its transaction;
                # `abandoned`: the writer gave up on it (its transaction failed), go on to the next file.
                try:
                    while batch := list(itertools.islice(chunks, STREAM_BATCH)):
                        if not self._put_to(batches, batch, abandoned):
                            break
                    else:
                        self._put_to(batches, self._END, abandoned)
                except LlmosError as exc:
                    self._put_to(batches, exc, abandoned)
                if self._stop.is_set():
                    return
        except BaseException as exc:  # a bug in the reader: the writer raises it
            self._put(("error", None, exc))
        finally:
            self._put(("done", None, None))

    def _put_to(self, target: queue.Queue, item: Any, abandoned: threading.Event) -> bool:
        while not self._stop.is_set() and not abandoned.is_set():
            with contextlib.suppress(queue.Full):
                target.put(item, timeout=0.1)
                return True
        return False

    def _drain(self, batches: queue.Queue, abandoned: threading.Event) -> Iterator[list[ingest.Chunk]]:
        """The writer's side of one document's batches; closing it early abandons the document."""
        try:
            while (item := batches.get()) is not self._END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            abandoned.set()

    def __iter__(self) -> Iterator[tuple[str, Path, Any]]:
        while True:
            kind, file, value = self._queue.get()
            if kind == "done":
                return
            if kind == "error":
                raise value
            yield kind, file, value


@dataclass(frozen=True)
class IndexStats:
    path: str
    documents: int
    chunks: int
    embed_model: str | None
    dim: int | None
    file_size: int
    split_blocks: int
    ann_threshold: int
    ann: str  # "exact", "usearch", or why not ("usearch not installed")
    ann_recall_at_10: float | None  # ANN vs exact on sampled queries, when measured

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Index:
    """A document index in one SQLite file (created on first use).

    `embedder` is an `Embedder`, a model name or path, or None: then the model the index was built
    with (or the default embedding model, for a new index) is loaded the first time one is needed.
    Keyword search, `documents()`, `stats()` and `remove()` never load a model.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, embedder: Any = None, *,
                 ann_threshold: int = DEFAULT_ANN_THRESHOLD) -> None:
        self.path = Path(path).expanduser() if path is not None else default_index_path()
        if self.path.is_dir():
            raise LlmosError(f"{self.path} is a folder; an index is a single file (e.g. {self.path / 'index.sqlite'})")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.ann_threshold = int(ann_threshold)
        self._embedder = None
        self._embedder_spec = embedder
        self._graph: AnnGraph | None = None  # the HNSW graph, opened on first use
        self._count: tuple[int, int] = (-1, 0)  # (generation, chunks): no count(*) per query
        self._query_vectors: dict[str, np.ndarray] = {}  # recent queries: hybrid after vector embeds once
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None  # embeds a query beside the keyword search
        self.db = IndexDB(self.path)
        if embedder is not None and not isinstance(embedder, (str, os.PathLike)):
            self._check_model(embedder)
            self._embedder = embedder

    @property
    def embed_model(self) -> str | None:
        """The embedding model this index was built with (None until the first document)."""
        return self.db.meta("embed_model")

    def _check_model(self, embedder: Any) -> None:
        self.db.check_model(embedder.name, embedder.fingerprint)

    @property
    def embedder(self) -> Any:
        """The embedding model, loaded on first use."""
        if self._embedder is None:
            from llmos.tasks.embed import Embedder

            spec = self._embedder_spec or self.embed_model or store.DEFAULT_EMBED_MODEL
            embedder = Embedder.load(spec, "auto")
            self._check_model(embedder)
            self._embedder = embedder
        return self._embedder

    # --- writing ----------------------------------------------------------------------------------

    def add(self, paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]], *, progress: bool = False,
            batch_size: int = 32) -> AddReport:
        """Index files and folders (recursively; hidden entries skipped). Unchanged files are not
        re-embedded; files deleted from an added folder are dropped. A named file that is missing or
        of an unsupported type is an error before anything is written; a file that fails to read
        inside a folder is reported in `failed` and the rest go on.

        A reader thread hashes, extracts and chunks the next files while this one embeds and writes
        (`_Pipeline`); each document is still written in one transaction of its own."""
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        report = AddReport()
        files, folders = self._collect(paths, report)
        if not files and not folders:
            raise LlmosError("nothing to add: give files or folders")
        embedder = self.embedder
        self._open_graph_for_writes()
        recorded = {f: self.db.sha256(f) for f in files}  # read here: the SQLite connection stays on this thread
        total = sum(f.stat().st_size for f in files if f.exists())
        bar = tqdm(desc="indexing", unit="B", unit_scale=True, total=total, disable=not progress)
        # Small documents are embedded together (one batch serves many files), then each is still
        # committed in its own transaction. A large one streams: its chunks are embedded and written
        # STREAM_BATCH at a time inside its transaction, so memory does not grow with it.
        pending: list[_Prepared] = []
        started, embedded = time.perf_counter(), 0
        with _Pipeline(self, files, recorded, embedder, batch_size) as pipeline:
            for kind, file, value in pipeline:
                if kind == "unchanged":
                    report.unchanged.append(str(file))
                    bar.update(file.stat().st_size)
                elif kind == "failed":
                    report.failed.append((str(file), value))
                elif value.rest is None:  # "document", small: wait for company
                    pending.append(value)
                    if sum(len(p.chunks) for p in pending) >= batch_size:
                        self._embed_and_write(pending, embedder, report, batch_size, bar)
                else:
                    self._embed_and_write(pending, embedder, report, batch_size, bar)
                    try:
                        self._write_streaming(value, embedder, report, batch_size, bar)
                    except LlmosError as exc:
                        report.failed.append((str(file), str(exc).removeprefix(f"{file}: ")))
                if report.embedded != embedded:
                    embedded = report.embedded
                    bar.set_postfix_str(f"{embedded} chunks, {embedded / (time.perf_counter() - started):.1f} chunks/s",
                                        refresh=False)
            self._embed_and_write(pending, embedder, report, batch_size, bar)
        bar.close()
        present = {str(f) for f in files}
        for folder in folders:  # files that are gone from an added folder
            for path in self.db.paths_under(folder):
                if path not in present and not Path(path).exists():
                    self._follow(self.db.delete(path))
                    report.removed.append(path)
        self._save_graph()
        return report

    def _collect(self, paths: Iterable[str | os.PathLike[str]], report: AddReport) -> tuple[list[Path], list[Path]]:
        files: dict[Path, None] = {}
        folders: list[Path] = []
        for given in paths:
            path = Path(given).expanduser()
            if not path.exists():
                raise LlmosError(f"no such file or folder: {given}")
            path = path.resolve()
            if path.is_dir():
                folders.append(path)
                for found in sorted(path.rglob("*")):
                    if any(part.startswith(".") for part in found.relative_to(path).parts) or not found.is_file():
                        continue
                    if ingest.supported(found):
                        files[found] = None
                    else:
                        report.skipped += 1
            elif ingest.supported(path):
                files[path] = None
            else:
                raise LlmosError(f"{given}: unsupported file type {path.suffix or '(none)'} (not text by its content); "
                                 f"llmos indexes text files, {', '.join(sorted(ingest.READERS))}")
        return list(files), folders

    @staticmethod
    def _prepare(path: Path, recorded: str | None, embedder: Any, first: int) -> _Prepared | None:
        """Hash one file and start chunking it; None when the index already has this exact content.
        Runs on the pipeline's reader thread: no database access here (`recorded` is the sha256 the
        index holds for the path)."""
        digest, size = hashlib.sha256(), 0
        with open(path, "rb") as f:  # in blocks: the hash needs no second copy of a large file
            while block := f.read(1 << 20):
                digest.update(block)
                size += len(block)
        if recorded == digest.hexdigest():
            return None
        document = ingest.extract(path)
        counts: dict[str, int] = {}
        chunks = ingest.iter_chunks(document, embedder.count_tokens, embedder.max_tokens, counts)
        head = list(itertools.islice(chunks, first + 1))
        rest = itertools.chain(head[first:], chunks) if len(head) > first else None
        return _Prepared(path, digest.hexdigest(), size, document.kind, head[:first], rest, counts,
                         update=recorded is not None, n_chars=max(len(document.text), 1))

    def _embed(self, chunks: list[ingest.Chunk], embedder: Any, batch_size: int) -> np.ndarray:
        out = embedder.embed([c.embed_text for c in chunks], batch_size=batch_size)
        if out.truncated:  # the chunker measured every chunk with this tokenizer; this is a bug
            raise RuntimeError(f"{len(out.truncated)} chunks exceed the embedding model's {embedder.max_tokens} tokens")
        return _normalized(out.vectors)

    def _embed_and_write(self, pending: list[_Prepared], embedder: Any, report: AddReport, batch_size: int,
                         bar: Any) -> None:
        if not pending:
            return
        vectors = self._embed([c for p in pending for c in p.chunks], embedder, batch_size)
        start = 0
        for p in pending:
            n = len(p.chunks)
            self._write(p, [(p.chunks, vectors[start:start + n])], embedder, report)
            bar.update(p.size)
            start += n
        pending.clear()

    def _write_streaming(self, p: _Prepared, embedder: Any, report: AddReport, batch_size: int, bar: Any) -> None:
        """A large document, STREAM_BATCH chunks at a time: embedded and inserted in turn, in one
        transaction; the reader thread packs the next batch meanwhile."""
        shown = 0

        def batches() -> Iterator[tuple[list[ingest.Chunk], np.ndarray]]:
            nonlocal shown
            for batch in itertools.chain([p.chunks], p.rest):
                yield batch, self._embed(batch, embedder, batch_size)
                done = p.size * batch[-1].char_end // p.n_chars  # progress in bytes, by how far into the text
                bar.update(max(done - shown, 0))
                shown = max(done, shown)

        try:
            self._write(p, batches(), embedder, report)
        finally:
            p.rest.close()  # written or failed, the reader thread moves on to the next file
        bar.update(p.size - shown)

    def _write(self, p: _Prepared, batches: Iterable[tuple[list[ingest.Chunk], np.ndarray]], embedder: Any,
               report: AddReport) -> None:
        model = EmbedModel(_model_label(embedder), embedder.name, embedder.fingerprint, embedder.dim)
        written = self.db.write(p.path, p.kind, p.sha256, p.size, p.counts, model, batches)
        self._follow(written)
        (report.updated if p.update else report.added).append(str(p.path))
        report.embedded += written.chunks
        report.split_blocks += p.counts.get("split_blocks", 0)

    def remove(self, paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[str]:
        """Drop documents (a folder drops everything under it); returns the paths removed.
        A path that matches nothing in the index is an error, and nothing is removed."""
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        targets: list[str] = []
        for given in paths:
            path = str(Path(given).expanduser().resolve())
            matched = [path] if self.db.has(path) else self.db.paths_under(Path(path))
            if not matched:
                raise LlmosError(f"not in the index: {given}")
            targets.extend(matched)
        self._open_graph_for_writes()
        for path in targets:
            self._follow(self.db.delete(path))
        self._save_graph()
        return targets

    # --- reading ----------------------------------------------------------------------------------

    def documents(self) -> list[DocumentInfo]:
        return self.db.documents()

    def __len__(self) -> int:
        """Number of chunks."""
        generation = self.db.generation()
        if self._count[0] != generation:
            self._count = (generation, self.db.chunk_count())
        return self._count[1]

    def search(self, query: str, k: int = 5, mode: str = "hybrid", *, ann: bool | None = None) -> list[SearchResult]:
        """The `k` best passages for `query`. `ann`: None picks by the collection's size, True/False force it."""
        if not isinstance(query, str) or not query.strip():
            raise LlmosError("the query is empty")
        if mode not in MODES:
            raise LlmosError(f"unknown search mode {mode!r}; use one of {', '.join(MODES)}")
        if k < 1:
            raise LlmosError(f"k must be at least 1, got {k}")
        if self.db.empty():
            return []
        pool = max(50, 4 * k)
        if mode == "hybrid" and query not in self._query_vectors and self._beside():
            # The query embeds and probes the graph on one thread (C++ calls without the GIL) while this
            # one ranks the keyword side in Python; the database is read on this thread only.
            graph = self._synced_graph() if self._use_ann(ann) else None
            vector_side = self._worker().submit(self._embed_and_probe, query, graph, pool)
            kw = self.db.keyword(query, pool)
            qvec, candidates = vector_side.result()
            vec = self._rerank(qvec, candidates, pool) if graph is not None else self._exact_search(qvec[None], pool)[0]
            return self._results(fuse(vec, kw)[:k], qvec)
        qvec = self._query_vector(query) if mode != "keyword" else None
        vec = self._vector_candidates(qvec, pool if mode == "hybrid" else k, ann) if qvec is not None else []
        kw = self.db.keyword(query, pool if mode == "hybrid" else k) if mode != "vector" else []
        ranked = vec if mode == "vector" else kw if mode == "keyword" else fuse(vec, kw)
        return self._results(ranked[:k], qvec)

    def _beside(self) -> bool:
        """Whether a query embedding can run beside the keyword search: two threads or more allowed,
        and an embedder whose forward releases the GIL (known after its first batch: until then, in turn)."""
        if getattr(self.embedder, "native", None) is not True:
            return False
        import torch  # loaded by then (the embedder's); not at import: the CLI sets threads before torch loads

        return torch.get_num_threads() >= 2

    def _embed_and_probe(self, query: str, graph: AnnGraph | None, n: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(query vector, the graph's candidates for the top n, or None without a graph), on one thread."""
        qvec = self._query_vector(query, 1)
        return qvec, _probe(graph, qvec[None], n)[0] if graph is not None else None

    def _worker(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="llmos-query")
        return self._pool

    def _query_vector(self, query: str, threads: int = 0) -> np.ndarray:
        """The query's unit vector, remembered for the last 256 queries (hybrid after vector, the
        fusion tuning's candidates after a search, embed once). `threads`: as `Embedder.embed_query`."""
        qvec = self._query_vectors.get(query)
        if qvec is None:
            qvec = _normalized((self.embedder.embed_query(query, threads) if threads else self.embedder.embed_query(query))[None])[0]
            if len(self._query_vectors) >= 256:
                self._query_vectors.pop(next(iter(self._query_vectors)))
            self._query_vectors[query] = qvec
        return qvec

    def candidates(self, query: str, n: int) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
        """The vector and keyword candidate lists hybrid search fuses, n each (for tuning the fusion)."""
        return self._vector_candidates(self._query_vector(query), n, None), self.db.keyword(query, n)

    def _results(self, ranked: list[tuple[int, float]], qvec: np.ndarray | None) -> list[SearchResult]:
        if not ranked:
            return []
        rows = self.db.chunk_rows([cid for cid, _ in ranked])
        out = []
        for rank, (cid, score) in enumerate(ranked, start=1):
            r = rows[cid]
            sim = float(np.frombuffer(r[9], dtype="<f4") @ qvec) if qvec is not None else None
            out.append(SearchResult(rank, float(score), sim, r[1], r[2], tuple(json.loads(r[3])), r[4], r[5], r[6], r[7], r[8], cid))
        return out

    def _use_ann(self, ann: bool | None) -> bool:
        return ann if ann is not None else len(self) >= self.ann_threshold and _usearch_available()

    def _vector_candidates(self, qvec: np.ndarray, n: int, ann: bool | None) -> list[tuple[int, float]]:
        if self._use_ann(ann):
            return self._ann_search(qvec[None], n)[0]
        return self._exact_search(qvec[None], n)[0]

    def _exact_search(self, queries: np.ndarray, n: int) -> list[list[tuple[int, float]]]:
        """Exact top-n: over the cached matrix below the ANN threshold, streaming the table above it."""
        if len(self) < self.ann_threshold:
            ids, matrix = self.db.vectors()
            return exact_search(matrix, ids, queries, n)
        return exact_search_blocks(self.db.vector_blocks(), queries, n)

    # --- approximate search -----------------------------------------------------------------------

    @property
    def _graph_folder(self) -> Path:
        return Path(f"{self.path}.usearch")

    def _synced_graph(self) -> AnnGraph:
        """The HNSW graph, matching the database: as held, as saved by this or another process, or
        healed from the database (streaming) and saved."""
        generation = self.db.generation()
        if self._graph is not None and self._graph.generation == generation:
            return self._graph
        graph = AnnGraph.open(self._graph_folder, int(self.db.meta("dim") or 0))
        if graph.generation != generation:
            self._heal(graph, generation)
        self._graph = graph
        return graph

    def _heal(self, graph: AnnGraph, generation: int) -> None:
        """Bring a graph to the database's state at `generation` (read before the ids: a change after
        it leaves the graph claiming an older generation, healed again next time)."""
        have, ids = graph.keys(), self.db.chunk_ids()
        graph.remove(np.setdiff1d(have, ids))
        threads = auto_threads()
        for block_ids, block in self.db.vectors_of(np.setdiff1d(ids, have), rows=_graph_rows()):
            graph.add(block_ids, block, threads=threads)
            if graph.full_unsaved():  # keep memory at about a segment; -1: the graph is not whole yet
                graph.save(-1)
        graph.save(generation)
        graph.release()

    def _graph_maintained(self) -> bool:
        """Writes keep a graph once the collection needs one, or when one is there already."""
        if not _usearch_available() or self.db.meta("dim") is None:  # no vectors yet
            return False
        return len(self) >= self.ann_threshold or self._graph_folder.exists()

    def _open_graph_for_writes(self) -> None:
        """Before writing: the graph in step with the database, so each commit can be applied to it."""
        if self._graph_maintained():
            self._synced_graph()

    def _follow(self, written: Written) -> None:
        """Apply one committed change to the graph, when it matched the database just before it;
        otherwise (another writer came between, or no graph yet) `_save_graph` heals it."""
        graph = self._graph
        if graph is None or graph.generation != written.generation - 1:
            return
        graph.remove(written.removed)
        for ids, vectors in self.db.vector_blocks(after=written.first - 1, last=written.last, rows=_graph_rows()):
            graph.add(ids, vectors)
            if graph.full_unsaved():  # a large document: save as segments fill, not yet claiming this commit
                graph.save(-1)
        graph.generation = written.generation
        if graph.full_unsaved():
            graph.save(written.generation)

    def _save_graph(self) -> None:
        """After writing: save what `_follow` applied, heal what it could not, and unload the graph's
        segments (searches map them from disk)."""
        if not self._graph_maintained():
            return
        graph = self._synced_graph()
        if graph.dirty():
            graph.save(graph.generation)
        graph.release()

    def _ann_search(self, queries: np.ndarray, n: int) -> list[list[tuple[int, float]]]:
        """Top-n (id, cosine) per query: the graph's candidates, reranked by their exact vectors."""
        return [self._rerank(query, candidates, n) for query, candidates in zip(queries, _probe(self._synced_graph(), queries, n))]

    def _rerank(self, query: np.ndarray, candidates: np.ndarray, n: int) -> list[tuple[int, float]]:
        """The top n of the graph's candidates by their exact vectors' cosine with `query` (D,)."""
        return exact_search_blocks(self.db.vectors_of(candidates), query[None], n)[0]

    def ann_recall(self, n_queries: int = 100, k: int = 10, seed: int = 0) -> float:
        """Mean recall@k of the ANN against exact search, on queries halfway between stored vectors."""
        ids = self.db.chunk_ids()
        if len(ids) < 2:
            raise LlmosError("the index needs at least two chunks to measure ANN recall")
        rng = np.random.default_rng(seed)
        pairs = ids[rng.integers(0, len(ids), (n_queries, 2))]  # (Q, 2)
        found = {int(i): v for block_ids, block in self.db.vectors_of(np.unique(pairs)) for i, v in zip(block_ids, block)}
        queries = _normalized(np.stack([found[int(a)] + found[int(b)] for a, b in pairs]))
        exact = self._exact_search(queries, k)
        approx = self._ann_search(queries, k)
        hits = [len({c for c, _ in e} & {c for c, _ in p}) / len(e) for e, p in zip(exact, approx)]
        return float(np.mean(hits))

    def stats(self, check_ann: bool = False) -> IndexStats:
        """Counts, model, file size, and which vector search runs; `check_ann` (or an index past the
        ANN threshold) measures the ANN's recall@10 against exact search."""
        docs, split = self.db.totals()
        chunks = len(self)
        dim = self.db.meta("dim")
        over = chunks >= self.ann_threshold
        recall = None
        if not _usearch_available():
            ann = "exact (usearch not installed)"
        else:
            ann = "usearch" if over else "exact"
            if (over or check_ann) and chunks >= 2:
                recall = self.ann_recall()
        return IndexStats(str(self.path), docs, chunks, self.embed_model, int(dim) if dim else None, self.db.file_size(), split,
                          self.ann_threshold, ann, recall)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        self.db.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Index({str(self.path)!r})"


def fuse(vector: list[tuple[int, float]], keyword: list[tuple[int, float]], k: float = RRF_K,
         vector_weight: float = VECTOR_WEIGHT) -> list[tuple[int, float]]:
    """Weighted reciprocal-rank fusion of two ranked candidate lists: (id, score), best first."""
    fused: dict[int, float] = {}
    for weight, candidates in ((vector_weight, vector), (1.0, keyword)):
        for rank, (cid, _) in enumerate(candidates):
            fused[cid] = fused.get(cid, 0.0) + weight / (k + rank + 1)
    return sorted(fused.items(), key=lambda item: -item[1])


def exact_search(matrix: np.ndarray, ids: np.ndarray, queries: np.ndarray, n: int) -> list[list[tuple[int, float]]]:
    """Top-n (id, cosine) per query by one matrix product; unit vectors in, best first."""
    return exact_search_blocks([(ids, matrix)], queries, n)


def exact_search_blocks(blocks: Iterable[tuple[np.ndarray, np.ndarray]], queries: np.ndarray,
                        n: int) -> list[list[tuple[int, float]]]:
    """Top-n (id, cosine) per query over (ids, vectors) blocks, keeping only the best n so far: the
    memory of one block, however many there are. Unit vectors in, best first."""
    best_ids = np.zeros((len(queries), 0), dtype=np.int64)
    best = np.zeros((len(queries), 0), dtype=np.float32)
    for ids, matrix in blocks:
        scores = np.concatenate([best, queries @ matrix.T], axis=1)  # (Q, kept + block)
        every = np.concatenate([best_ids, np.broadcast_to(ids, (len(queries), len(ids)))], axis=1)
        if scores.shape[1] > n:
            top = np.argpartition(-scores, n - 1, axis=1)[:, :n]
            scores, every = np.take_along_axis(scores, top, axis=1), np.take_along_axis(every, top, axis=1)
        best, best_ids = scores, every
    out = []
    for q in range(len(queries)):
        order = np.argsort(-best[q], kind="stable")
        out.append([(int(best_ids[q, i]), float(best[q, i])) for i in order])
    return out


def _probe(graph: AnnGraph, queries: np.ndarray, n: int) -> list[np.ndarray]:
    """The graph's candidate ids for each query's top n (more than n: reranked by exact vectors after)."""
    return graph.search(queries, max(ANN_CANDIDATES * n, ANN_MIN_CANDIDATES))


def _normalized(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


def _graph_rows() -> int:
    """Vectors read from the database per graph insertion: a block never fills more than one
    segment and starts the next, so at most two are in memory."""
    return min(8192, ann.SEGMENT_SIZE)


@functools.cache
def _usearch_available() -> bool:
    """Asked on every search and write: the import is tried once a process."""
    try:
        ann._usearch()
    except LlmosError:
        return False
    return True


def _model_label(embedder: Any) -> str:
    """A store name stays a name; anything else is recorded as its absolute path."""
    name = str(embedder.name)
    return name if name in store.DEFAULT_MODELS or not Path(name).expanduser().exists() else str(embedder.path.resolve())
