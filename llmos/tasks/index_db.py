"""The storage of an index (tasks/index.py): one SQLite file of documents, chunks, vectors and hashes.

`IndexDB` owns the connection and every SQL statement: the schema, the metadata (schema version,
embedding model, a generation counter bumped by every change), writing a document in one transaction,
deleting, listing, BM25 keyword candidates from FTS5, and the vectors: all as one matrix (cached until
the generation changes; for small collections), streamed in blocks, or by id. It knows nothing of
embedding models or ranking: `Index` does the search above it.

Chunk ids are never reused (`next_chunk_id` in the metadata, past every id ever written): the HNSW
graph beside the index (tasks/ann.py) knows a chunk by its id, and a replaced document's chunks
taking the ids of the old ones would leave the old vectors in the graph under the new chunks' ids.

SQLite runs in WAL mode with `synchronous=FULL`: a document's rows (document, chunks, full-text
entries, vectors, replacing any older version) are written in one transaction, so a crash leaves
every completed document present and none half-written.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmos.errors import LlmosError
from llmos.tasks import bm25, ingest

SCHEMA_VERSION = "1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    n_chunks INTEGER NOT NULL,
    split_blocks INTEGER NOT NULL,
    indexed_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY,
    doc_id INTEGER NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
    ord INTEGER NOT NULL,
    text TEXT NOT NULL,
    heading TEXT NOT NULL,
    char_start INTEGER NOT NULL,
    char_end INTEGER NOT NULL,
    line_start INTEGER NOT NULL,
    line_end INTEGER NOT NULL,
    page INTEGER,
    n_tokens INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS chunks_by_doc ON chunks(doc_id);
CREATE TABLE IF NOT EXISTS vectors (
    chunk_id INTEGER PRIMARY KEY REFERENCES chunks(id) ON DELETE CASCADE,
    vector BLOB NOT NULL
);
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(text, heading, tokenize='porter unicode61 remove_diacritics 2');
"""
FTS_TOKENIZE = "porter unicode61 remove_diacritics 2"  # as in the schema above
BOUNDED_ROWS = 50_000  # from this many chunks on, keyword search is bounded (tasks/bm25.py); below, FTS5's own query
SPARSE_IDS = 4  # ... while the largest chunk id is at most this many times the chunk count

# Words too common to help a keyword query; BM25 would weigh them down anyway, but as OR terms
# they would pull in every chunk.
_STOPWORDS = frozenset(
    "a an and are as at be by can do does for from how i in is it of on or that the this to was what "
    "when where which who why will with you your my me we our they their there these those into".split()
)


@dataclass(frozen=True)
class DocumentInfo:
    path: str
    kind: str
    chunks: int
    size: int
    sha256: str
    indexed_at: float


@dataclass(frozen=True)
class Written:
    """What one transaction changed: the chunk ids it added (consecutive, `first` to `last`; none when
    first > last), those it removed, and the generation it committed."""

    first: int
    last: int
    removed: list[int]
    generation: int

    @property
    def chunks(self) -> int:
        return self.last - self.first + 1


@dataclass(frozen=True)
class EmbedModel:
    """What the index records of the model its vectors come from."""

    label: str  # a store name, or an absolute path
    name: str  # as the embedder calls itself (for messages)
    fingerprint: str
    dim: int


class IndexDB:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._matrix: tuple[int, np.ndarray, np.ndarray] | None = None  # (generation, ids, vectors)
        self._bm25: bm25.BoundedBM25 | None = None  # made on the first bounded keyword query
        self._uid_known = False  # the metadata holds a uid (checked on the first write)
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, timeout=60.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            version = self.meta("schema") if self._has_meta() else None
            if version is None:
                tables = self._db.execute("SELECT count(*) FROM sqlite_master WHERE type='table'").fetchone()[0]
                if tables:
                    raise LlmosError(f"{self.path} is a SQLite file but not an llmos index")
                self._db.executescript("BEGIN;" + _SCHEMA + "COMMIT;")
                self._set_meta({"schema": SCHEMA_VERSION, "generation": "0", "uid": secrets.token_hex(16)})
            elif version != SCHEMA_VERSION:
                raise LlmosError(f"{self.path} is an llmos index of schema {version}; this llmos reads schema {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            raise LlmosError(f"{self.path} is not a usable index ({exc})") from exc

    # --- metadata ---------------------------------------------------------------------------------

    def _has_meta(self) -> bool:
        return self._db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone() is not None

    def meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def _set_meta(self, values: dict[str, str]) -> None:
        self._db.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", list(values.items()))

    def generation(self) -> int:
        """Bumped by every change: caches of the vectors compare it."""
        return int(self.meta("generation") or 0)

    def check_model(self, name: str, fingerprint: str) -> None:
        """Refuse vectors from another model than the one the index was built with."""
        recorded = self.meta("embed_fingerprint")
        if recorded is not None and recorded != fingerprint:
            raise LlmosError(
                f"{self.path} was built with embedding model {self.meta('embed_model')!r}, not {name!r}: "
                "use the same model, or a new index for this one"
            )

    # --- writing ----------------------------------------------------------------------------------

    def sha256(self, path: Path) -> str | None:
        """The content hash recorded for a document (None when it is not in the index)."""
        row = self._db.execute("SELECT sha256 FROM documents WHERE path=?", (str(path),)).fetchone()
        return None if row is None else row[0]

    def write(self, path: Path, kind: str, sha256: str, size: int, counts: dict[str, int], model: EmbedModel,
              batches: Iterable[tuple[list[ingest.Chunk], np.ndarray]]) -> Written:
        """One document, replacing any older version of it, in one transaction (a reader sees the old
        version or the new one, never half of it). `batches` may chunk and embed as it goes: it is
        read inside the transaction, and `counts["split_blocks"]` (the chunker's) after it."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            if self.meta("embed_fingerprint") is None:
                self._set_meta({"embed_model": model.label, "embed_fingerprint": model.fingerprint, "dim": str(model.dim)})
            else:
                self.check_model(model.name, model.fingerprint)
            first = self._next_chunk_id()
            removed = self._delete_rows(str(path))
            doc_id = db.execute(
                "INSERT INTO documents(path, kind, sha256, size, n_chunks, split_blocks, indexed_at) VALUES (?,?,?,?,?,?,?)",
                (str(path), kind, sha256, size, 0, 0, time.time()),
            ).lastrowid
            cid = first
            for chunks, vectors in batches:
                for c, vector in zip(chunks, vectors):
                    db.execute(
                        "INSERT INTO chunks(id, doc_id, ord, text, heading, char_start, char_end, line_start, line_end, page,"
                        " n_tokens) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                        (cid, doc_id, cid - first, c.text, json.dumps(c.heading), c.char_start, c.char_end, c.line_start,
                         c.line_end, c.page, c.n_tokens),
                    )
                    db.execute("INSERT INTO chunks_fts(rowid, text, heading) VALUES (?,?,?)",
                               (cid, c.text, " > ".join(c.heading)))
                    db.execute("INSERT INTO vectors(chunk_id, vector) VALUES (?,?)", (cid, vector.astype("<f4").tobytes()))
                    cid += 1
            db.execute("UPDATE documents SET n_chunks=?, split_blocks=? WHERE id=?",
                       (cid - first, counts.get("split_blocks", 0), doc_id))
            self._set_meta({"next_chunk_id": str(cid)} | self._missing_uid())
            generation = self._bump()
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return Written(first, cid - 1, removed or [], generation)

    def _missing_uid(self) -> dict[str, str]:
        """{"uid": a new one} for an index made before uids (read once per IndexDB: a uid is never removed)."""
        if not self._uid_known:
            self._uid_known = self.meta("uid") is not None
            if not self._uid_known:
                return {"uid": secrets.token_hex(16)}
        return {}

    def _next_chunk_id(self) -> int:
        """Past every chunk id this index has used (an index from before the counter: past the largest)."""
        recorded = int(self.meta("next_chunk_id") or 0)
        return max(recorded, self._db.execute("SELECT coalesce(max(id), 0) + 1 FROM chunks").fetchone()[0])

    def _bump(self) -> int:
        self._db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key='generation'")
        return self.generation()

    def _delete_rows(self, path: str) -> list[int] | None:
        """Delete one document's rows; returns its chunk ids (None when it is not there)."""
        row = self._db.execute("SELECT id FROM documents WHERE path=?", (path,)).fetchone()
        if row is None:
            return None
        removed = [r[0] for r in self._db.execute("SELECT id FROM chunks WHERE doc_id=?", (row[0],))]
        ids = "SELECT id FROM chunks WHERE doc_id=?"
        self._db.execute(f"DELETE FROM chunks_fts WHERE rowid IN ({ids})", (row[0],))
        self._db.execute(f"DELETE FROM vectors WHERE chunk_id IN ({ids})", (row[0],))
        self._db.execute("DELETE FROM chunks WHERE doc_id=?", (row[0],))
        self._db.execute("DELETE FROM documents WHERE id=?", (row[0],))
        return removed

    def delete(self, path: str) -> Written:
        """Drop one document (nothing when it is not there), in its own transaction."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            # Keep the counter past the ids deleted here, should they be the largest.
            self._set_meta({"next_chunk_id": str(self._next_chunk_id())})
            removed = self._delete_rows(path)
            generation = self.generation() if removed is None else self._bump()
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return Written(0, -1, removed or [], generation)

    # --- reading ----------------------------------------------------------------------------------

    def has(self, path: str) -> bool:
        return self._db.execute("SELECT 1 FROM documents WHERE path=?", (path,)).fetchone() is not None

    def paths_under(self, folder: Path) -> list[str]:
        prefix = str(folder).rstrip(os.sep) + os.sep
        rows = self._db.execute("SELECT path FROM documents WHERE substr(path, 1, ?) = ?", (len(prefix), prefix))
        return [r[0] for r in rows]

    def documents(self) -> list[DocumentInfo]:
        rows = self._db.execute("SELECT path, kind, n_chunks, size, sha256, indexed_at FROM documents ORDER BY path")
        return [DocumentInfo(*r) for r in rows]

    def chunk_count(self) -> int:
        return self._db.execute("SELECT count(*) FROM chunks").fetchone()[0]

    def empty(self) -> bool:
        return self._db.execute("SELECT 1 FROM chunks LIMIT 1").fetchone() is None  # no count(*) scan per query

    def totals(self) -> tuple[int, int]:
        """(documents, paragraphs split because they were too long for one chunk)."""
        return self._db.execute("SELECT count(*), coalesce(sum(split_blocks), 0) FROM documents").fetchone()

    def chunk_rows(self, ids: list[int]) -> dict[int, tuple[Any, ...]]:
        """chunk id -> (id, path, text, heading JSON, line_start, line_end, char_start, char_end, page, vector bytes)."""
        marks = ",".join("?" * len(ids))
        return {r[0]: r for r in self._db.execute(
            "SELECT c.id, d.path, c.text, c.heading, c.line_start, c.line_end, c.char_start, c.char_end, c.page, v.vector"
            f" FROM chunks c JOIN documents d ON d.id = c.doc_id JOIN vectors v ON v.chunk_id = c.id WHERE c.id IN ({marks})",
            ids,
        )}

    def keyword(self, query: str, n: int) -> list[tuple[int, float]]:
        """The n best chunks for the query's words by FTS5 BM25: (chunk id, score), best first."""
        return self.keyword_ranked(query, n).rows

    def keyword_ranked(self, query: str, n: int, bounded: bool | None = None) -> bm25.Ranked:
        """`keyword` with how it was found. Past BOUNDED_ROWS chunks (or with `bounded`), by
        `bm25.BoundedBM25`: FTS5's scores at a bounded cost, `exact` where the list is provably
        FTS5's; below, by FTS5's own query (exact, and fast at that size)."""
        words = self._query_words(query)
        if not words:
            return bm25.Ranked([], True, 0, 0)
        if bounded is None:
            rows = self._fts_rows()
            # The bounded search keeps arrays indexed by chunk id (int32): not for ids far beyond the
            # row count (ids are never reused, so re-indexing raises them) or past 2^31.
            bounded = rows >= BOUNDED_ROWS and self._top_chunk_id() <= min(SPARSE_IDS * rows, 2**31 - 1)
        if bounded:
            if self._bm25 is None:
                self._bm25 = bm25.BoundedBM25(self._db, "chunks_fts", FTS_TOKENIZE, 2, self.lengths_file, self.meta("uid"))
            return self._bm25.top(words, n)
        match = " OR ".join(f'"{w}"' for w in words)
        rows = self._db.execute(
            "SELECT rowid, bm25(chunks_fts) FROM chunks_fts WHERE chunks_fts MATCH ? ORDER BY bm25(chunks_fts) LIMIT ?",
            (match, n),
        )
        return bm25.Ranked([(r[0], -float(r[1])) for r in rows], True, 0, 0)

    @staticmethod
    def _query_words(query: str) -> list[str]:
        """The query's words as FTS5 phrases: lowercased, stopwords dropped (unless that leaves none), once each."""
        words = re.findall(r"\w+", query.lower())
        return list(dict.fromkeys([w for w in words if w not in _STOPWORDS] or words))

    def _top_chunk_id(self) -> int:
        return int(self._db.execute("SELECT max(id) FROM chunks_fts_content").fetchone()[0] or 0)

    def _fts_rows(self) -> int:
        """Rows in the full-text table, from FTS5's totals record (no count(*) scan)."""
        row = self._db.execute("SELECT block FROM chunks_fts_data WHERE id=1").fetchone()
        return bm25.totals_rows(row[0]) if row and row[0] else 0

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids (N,), vectors (N, D)) of every chunk, cached until the index changes. The whole table
        in memory (1.5 GB at a million chunks): for small collections only; large ones stream
        (`vector_blocks`) or read by id (`vectors_of`)."""
        generation = self.generation()
        if self._matrix is None or self._matrix[0] != generation:
            rows = self._db.execute("SELECT chunk_id, vector FROM vectors ORDER BY chunk_id").fetchall()
            self._matrix = (generation, *self._matrix_of(rows))
        return self._matrix[1], self._matrix[2]

    def _matrix_of(self, rows: list[tuple[int, bytes]]) -> tuple[np.ndarray, np.ndarray]:
        dim = int(self.meta("dim") or 0)
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        return ids, np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").reshape(len(rows), dim)

    def vector_blocks(self, after: int = 0, last: int | None = None,
                      rows: int = 8192) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, vectors) of the chunks with ids above `after` (up to `last`), in id order, `rows` at a
        time. Each block is its own query (by id range), so writes may come between blocks."""
        last = (1 << 62) if last is None else last
        while True:
            block = self._db.execute(
                "SELECT chunk_id, vector FROM vectors WHERE chunk_id > ? AND chunk_id <= ? ORDER BY chunk_id LIMIT ?",
                (after, last, rows)).fetchall()
            if not block:
                return
            yield self._matrix_of(block)
            after = block[-1][0]

    def vectors_of(self, ids: Iterable[int], rows: int = 8192) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, vectors) of these chunks (those that exist), `rows` at a time, in no set order."""
        ids = [int(i) for i in ids]
        for start in range(0, len(ids), rows):
            block = self._db.execute("SELECT chunk_id, vector FROM vectors WHERE chunk_id IN (SELECT value FROM json_each(?))",
                                     (json.dumps(ids[start:start + rows]),)).fetchall()
            if block:
                yield self._matrix_of(block)

    def chunk_ids(self) -> np.ndarray:
        """Every chunk id, ascending (8 bytes a chunk)."""
        cursor = self._db.execute("SELECT chunk_id FROM vectors ORDER BY chunk_id")
        return np.fromiter((r[0] for r in cursor), dtype=np.int64)

    @property
    def lengths_file(self) -> Path:
        """Where the keyword search keeps its rows' lengths between processes (bm25.RowLengths)."""
        return Path(f"{self.path}.bm25")

    def file_size(self) -> int:
        return sum(p.stat().st_size for p in (self.path, Path(f"{self.path}-wal"), self.lengths_file) if p.exists())

    def close(self) -> None:
        if self._bm25 is not None:
            self._bm25.close()
        self._db.close()
