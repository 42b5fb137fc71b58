"""The ingestion pipeline: a reader thread extracts and chunks ahead of the embedding, and a failure
anywhere leaves every document whole or absent (each is one transaction), with the reader stopped."""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest

from llmos.errors import LlmosError
from llmos.tasks import index as index_module
from llmos.tasks import ingest
from llmos.tasks.index import Index
from tests.tasks.test_ingest_streaming import StubEmbedder, write_doc


def _readers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "llmos-index-reader"]


def _corpus(folder):
    folder.mkdir()
    small = [write_doc(folder / f"a{i}.md", 3) for i in range(6)]
    big = write_doc(folder / "m-big.md", 400)  # many STREAM_BATCHes; sorted between the small ones
    later = [write_doc(folder / f"z{i}.md", 3) for i in range(3)]
    return small, big, later


def _whole_documents(path) -> dict[str, int]:
    """path -> chunks, checking that every document holds exactly the chunks, vectors and full-text
    rows it says it has (nothing half-written)."""
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    out = {}
    for doc_id, path_, n in db.execute("SELECT id, path, n_chunks FROM documents"):
        ids = [r[0] for r in db.execute("SELECT id FROM chunks WHERE doc_id=? ORDER BY ord", (doc_id,))]
        assert len(ids) == n > 0
        marks = ",".join("?" * len(ids))
        assert db.execute(f"SELECT count(*) FROM vectors WHERE chunk_id IN ({marks})", ids).fetchone()[0] == n
        assert db.execute(f"SELECT count(*) FROM chunks_fts WHERE rowid IN ({marks})", ids).fetchone()[0] == n
        out[path_] = n
    assert db.execute("SELECT count(*) FROM chunks WHERE doc_id NOT IN (SELECT id FROM documents)").fetchone()[0] == 0
    return out


def _failing_embedder(on_call: int, error: Exception) -> StubEmbedder:
    embedder = StubEmbedder()
    calls = []

    def failing(texts, batch_size=32):
        calls.append(len(texts))
        if len(calls) == on_call:
            raise error
        return StubEmbedder.embed(embedder, texts)

    embedder.embed = failing
    return embedder


def test_a_failure_mid_document_leaves_nothing_half_committed(tmp_path, monkeypatch):
    monkeypatch.setattr(index_module, "STREAM_BATCH", 20)
    small, big, later = _corpus(tmp_path / "docs")
    # The 4th call is inside the big document's transaction, with batches of it already inserted.
    embedder = _failing_embedder(4, LlmosError("the embedder failed"))
    with Index(tmp_path / "i.sqlite", embedder) as index:
        report = index.add([tmp_path / "docs"])
        assert [p for p, _ in report.failed] == [str(big)]
        assert sorted(report.added) == sorted(map(str, small + later))  # the pipeline went on past it
        assert not _readers()
    docs = _whole_documents(tmp_path / "i.sqlite")
    assert str(big) not in docs and len(docs) == len(small) + len(later)
    with Index(tmp_path / "i.sqlite", StubEmbedder()) as index:  # the next add does the rest
        again = index.add([tmp_path / "docs"])
        assert again.added == [str(big)] and len(again.unchanged) == len(small) + len(later)
    expected = len(ingest.chunk(ingest.extract(big), StubEmbedder().count_tokens, 64).chunks)
    assert _whole_documents(tmp_path / "i.sqlite")[str(big)] == expected


def test_an_unexpected_error_stops_the_reader_and_keeps_what_was_committed(tmp_path, monkeypatch):
    monkeypatch.setattr(index_module, "STREAM_BATCH", 20)
    small, big, _ = _corpus(tmp_path / "docs")
    embedder = _failing_embedder(3, RuntimeError("out of memory, say"))
    with Index(tmp_path / "i.sqlite", embedder) as index:
        with pytest.raises(RuntimeError, match="out of memory"):
            index.add([tmp_path / "docs"])
    assert not _readers()
    docs = _whole_documents(tmp_path / "i.sqlite")
    assert str(big) not in docs and set(docs) <= set(map(str, small))


def test_the_reader_extracts_ahead_of_the_embedding(tmp_path, monkeypatch):
    small, big, later = _corpus(tmp_path / "docs")
    extracted: list[str] = []
    real_extract = ingest.extract
    monkeypatch.setattr(ingest, "extract", lambda path: extracted.append(str(path)) or real_extract(path))
    embedder = StubEmbedder()
    seen_ahead = []

    def waiting(texts, batch_size=32):
        if not seen_ahead:  # the first batch: the reader must get past it on its own
            deadline = time.monotonic() + 10
            while len(extracted) < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            seen_ahead.append(len(extracted))
        return StubEmbedder.embed(embedder, texts)

    embedder.embed = waiting
    with Index(tmp_path / "i.sqlite", embedder) as index:
        report = index.add([tmp_path / "docs"], batch_size=4)
    assert seen_ahead[0] >= 3 and len(report.added) == len(small) + len(later) + 1
