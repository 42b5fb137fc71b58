"""Ingestion streams: a large file is chunked, embedded and written STREAM_BATCH chunks at a time,
so `Index.add`'s memory does not grow with the file; what it stores is exactly what the one-shot
chunker makes. Summarize/translate input has a stated size limit. A stub embedder (the Embedder
interface, vectors of ones) keeps these fast: the model's cost is the bench's business."""

from __future__ import annotations

import io
import sqlite3
import sys
from pathlib import Path

import numpy as np
import pytest

from llmos.errors import LlmosError
from llmos.tasks import index as index_module
from llmos.tasks import ingest
from llmos.tasks.index import Index


class StubEmbedder:
    name, fingerprint, dim, max_tokens, path = "stub", "stub", 8, 64, None

    def __init__(self) -> None:
        self.calls: list[int] = []

    def count_tokens(self, text: str) -> int:
        return len(text.split()) + 2

    def embed(self, texts, batch_size=32):
        self.calls.append(len(texts))

        class Out:
            truncated: list[int] = []
            vectors = np.ones((len(texts), 8), dtype=np.float32)
        return Out()


def write_doc(path: Path, paragraphs: int) -> Path:
    words = "river stone light market engine garden signal paper winter orbit".split()
    with open(path, "w") as f:
        for i in range(paragraphs):
            if i % 25 == 0:
                f.write(f"## Part {i // 25}\n\n")
            f.write(" ".join(words[(i + j) % 10] for j in range(20 + i % 90)) + ".\n\n")
    return path


def test_a_large_file_is_embedded_and_written_in_bounded_batches(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(index_module, "STREAM_BATCH", 50)
    doc = write_doc(tmp_path / "big.md", 2000)
    expected = ingest.chunk(ingest.extract(doc), StubEmbedder().count_tokens, 64)
    embedder = StubEmbedder()
    with Index(tmp_path / "i.sqlite", embedder) as index:
        report = index.add([doc], progress=True)
        assert report.added == [str(doc)] and report.embedded == len(expected.chunks) > 500
        assert report.split_blocks == expected.split_blocks > 0
        assert max(embedder.calls) <= 50  # never the whole document's chunks at once
        assert [d.chunks for d in index.documents()] == [len(expected.chunks)]
    assert "chunk" in capsys.readouterr().err  # the progress bar counts chunks
    db = sqlite3.connect(tmp_path / "i.sqlite")
    rows = db.execute("SELECT ord, text, char_start, line_start FROM chunks ORDER BY ord").fetchall()
    assert rows == [(i, c.text, c.char_start, c.line_start) for i, c in enumerate(expected.chunks)]
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_a_file_failing_midway_leaves_the_older_version(tmp_path, monkeypatch):
    monkeypatch.setattr(index_module, "STREAM_BATCH", 20)
    doc = write_doc(tmp_path / "big.md", 600)
    with Index(tmp_path / "i.sqlite", StubEmbedder()) as index:
        index.add([doc])
        before = len(index)
        write_doc(doc, 900)
        broken = StubEmbedder()
        calls = iter(range(10 ** 6))

        def failing(texts, batch_size=32):
            if next(calls) == 3:
                raise LlmosError("the embedder failed")
            return StubEmbedder.embed(broken, texts)

        index._embedder = broken
        broken.embed = failing
        report = index.add([doc])
        assert report.failed and len(index) == before  # the transaction rolled back whole


def test_peak_memory_does_not_grow_with_the_file():
    """The issue's yardstick: 1 MB and 10 MB files peak within 100 MB of each other (the pipeline's
    own memory, measured with the bench's stub embedder in fresh processes; 101 MB before streaming)."""
    sys.path.insert(0, str(Path(__file__).parents[2]))
    from bench.ingest import run

    results = run(stub=True, threads=1)
    assert results["10mb"]["chunks"] > 9 * results["1mb"]["chunks"]
    assert results["peak_rss_spread_mb"] < 60, results


def test_summarize_and_translate_input_has_a_stated_limit(tmp_path):
    from llmos.tasks.textfiles import MAX_TEXT_BYTES, read_file, read_stdin

    big = tmp_path / "big.txt"
    with open(big, "wb") as f:
        f.truncate(MAX_TEXT_BYTES + 1)
    with pytest.raises(LlmosError, match="at most 10 MB of text") as info:
        read_file(big)
    assert "10.0 MB" in str(info.value)
    with pytest.raises(LlmosError, match="standard input"):
        read_stdin(io.BytesIO(b"a" * (MAX_TEXT_BYTES + 1)))
    assert read_stdin(io.BytesIO(b"short text")) == "short text"


def test_one_huge_word_is_chunked_in_linear_work():
    """Found by the ingestion fuzzer: a 300 KB run without spaces ("x.x.x...") was cut one chunk at a
    time, each cut measuring the whole rest of the run (quadratic: over 5 minutes). Now the tokens
    measured stay within a small multiple of the text."""
    text = "x." * 100_000
    measured = []

    def count(t: str) -> int:
        measured.append(len(t))
        return len(t) // 2 + 2  # "x." is two characters, about one token each

    document = ingest.Document(Path("<huge>"), "text", text, ingest.split_lines(text, "text"))
    chunks = ingest.chunk(document, count, 128).chunks
    assert "".join(c.text for c in chunks) == text and all(count(c.text) <= 128 for c in chunks)
    assert sum(measured) < 40 * len(text), sum(measured) / len(text)
