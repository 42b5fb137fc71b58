"""The HNSW graph beside an index (tasks/ann.py), kept by each add and remove: built incrementally it
answers like a graph rebuilt from scratch, a crash between the database commit and the graph save is
healed on next use, and adding past the ANN threshold never holds the vector table in memory.

A hash embedder gives each chunk text a fixed unit vector near one of a few topics (as real
embeddings cluster), so no model is loaded and a rebuilt index has exactly the same vectors."""

from __future__ import annotations

import hashlib
import shutil
import sqlite3

import numpy as np
import pytest

from llmos.tasks import ann
from llmos.tasks.index import Index
from llmos.tasks.index_db import IndexDB

DIM = 32
TOPICS = np.random.default_rng(1).standard_normal((12, DIM)).astype(np.float32)


def _vector(text: str) -> np.ndarray:
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little"))
    v = TOPICS[rng.integers(len(TOPICS))] + 0.6 * rng.standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


class HashEmbedder:
    name, fingerprint, dim, max_tokens, path = "hash", "hash", DIM, 64, None

    def count_tokens(self, text: str) -> int:
        return len(text.split()) + 2

    def embed(self, texts, batch_size=32):
        class Out:
            truncated: list[int] = []
            vectors = np.stack([_vector(t) for t in texts])
        return Out()

    def embed_query(self, text: str) -> np.ndarray:
        return _vector(text)


FILLER = " ".join(["words"] * 36)  # two paragraphs exceed the embedder's 64 tokens: one paragraph, one chunk


def _paragraph(tag: str, i: int) -> str:
    return f"Paragraph {tag} {i} about item {tag}{i}x{i * 7 % 13} {FILLER}."  # distinct: so is its vector


def _doc(path, n: int, tag: str):
    path.write_text("".join(_paragraph(tag, i) + "\n\n" for i in range(n)))
    return path


def _graph_keys(index: Index) -> np.ndarray:
    return np.sort(ann.AnnGraph.open(index._graph_folder, DIM).keys())


@pytest.fixture
def small_segments(monkeypatch):
    monkeypatch.setattr(ann, "SEGMENT_SIZE", 700)  # several segments, filled and sealed during adds


@pytest.fixture
def no_vector_table(monkeypatch):
    """Fail any read of the whole vector table (what add and search must not need past the threshold)."""
    def refuse(self):
        raise AssertionError("IndexDB.vectors() read the whole vector table")
    monkeypatch.setattr(IndexDB, "vectors", refuse)


def _build_incrementally(tmp_path, monkeypatch) -> tuple[Index, list]:
    """Adds and removes past the threshold; checks that after the first build the graph is never
    rebuilt or healed (each document goes into it as it commits) and is saved by every call."""
    heals = []
    heal = Index._heal
    monkeypatch.setattr(Index, "_heal", lambda self, graph, generation: heals.append(len(graph)) or heal(self, graph, generation))
    docs = tmp_path / "docs"
    docs.mkdir()
    files = [_doc(docs / f"d{i}.txt", 400, f"d{i}") for i in range(6)]
    index = Index(tmp_path / "inc.sqlite", HashEmbedder(), ann_threshold=1000)
    index.add(files[:2])  # 800 chunks: below the threshold, no graph
    assert not index._graph_folder.exists()
    index.add(files[2:4])  # past it: the graph is built at the end of this add
    assert heals == [0]
    index.add(files[4:])  # then each document goes into it as it commits
    index.remove([files[1]])  # from a sealed segment
    _doc(files[3], 300, "d3v2")  # replaced: old chunks out, new ones in
    index.add([files[3]])
    _doc(files[5], 350, "d5v2")  # the newest document replaced: its new chunks must not take its old ids
    index.add([files[5]])
    assert heals == [0]
    assert ann.AnnGraph.open(index._graph_folder, DIM).generation == index.db.generation()  # saved
    monkeypatch.setattr(Index, "_heal", heal)
    return index, files


def test_incremental_graph_answers_like_a_rebuilt_one(tmp_path, small_segments, no_vector_table, monkeypatch):
    # Graphs built on one thread (a heal builds on `auto_threads()`): usearch's inserts on two threads
    # make a different graph each run, missing 2-7 of these 600 neighbours instead of at most 3.
    monkeypatch.setattr("llmos.tasks.index.auto_threads", lambda: 1)
    index, _ = _build_incrementally(tmp_path, monkeypatch)
    ids = index.db.chunk_ids()
    assert len(ids) == 400 * 3 + 300 + 350
    assert np.array_equal(_graph_keys(index), ids)  # exactly the database's chunks, each once

    rebuilt_path = tmp_path / "rebuilt.sqlite"
    with sqlite3.connect(rebuilt_path) as target:  # the same rows, no graph: built from scratch
        index.db._db.backup(target)
    rebuilt = Index(rebuilt_path, HashEmbedder(), ann_threshold=1000)

    queries = [f"question {i} about item d{i % 6}{i}" for i in range(60)]
    agree, recall_inc, recall_reb = [], [], []
    for q in queries:
        exact = {r.chunk_id for r in index.search(q, k=10, mode="vector", ann=False)}
        inc = [r.chunk_id for r in index.search(q, k=10, mode="vector", ann=True)]
        reb = [r.chunk_id for r in rebuilt.search(q, k=10, mode="vector", ann=True)]
        agree.append(len(set(inc) & set(reb)) / 10)
        recall_inc.append(len(exact & set(inc)) / 10)
        recall_reb.append(len(exact & set(reb)) / 10)
    assert rebuilt._graph_folder.is_dir()
    assert np.array_equal(_graph_keys(rebuilt), ids)
    # Candidates reranked by their exact vectors: both graphs find the exact top 10 (tolerance: three
    # neighbours in 600 missed, for HNSW's approximate candidate lists).
    missed = [round(10 * len(queries) * (1 - np.mean(r))) for r in (recall_inc, recall_reb, agree)]  # of 600
    assert max(missed) <= 3, missed
    # The replaced documents' new chunks are found by their own vectors, the old ones are gone.
    for text in (_paragraph("d5v2", 7), _paragraph("d3v2", 0)):
        top = index.search(text, k=1, mode="vector", ann=True)[0]
        assert top.text == text and top.similarity == pytest.approx(1.0, abs=1e-5)
    assert not index.search("d15x9", k=20, mode="keyword")  # removed
    assert index.stats().ann_recall_at_10 >= 0.99  # streams the exact side: no vector table either


def test_add_holds_no_more_than_one_segment_to_add_to(tmp_path, small_segments, no_vector_table, monkeypatch):
    loaded: list[int] = []
    writable = ann.AnnGraph._writable

    def counting(graph, segment):
        index = writable(graph, segment)
        loaded.append(sum(s.writable for s in graph._segments))
        return index

    monkeypatch.setattr(ann.AnnGraph, "_writable", counting)
    index, _ = _build_incrementally(tmp_path, monkeypatch)
    # The segment being filled, plus at most the sealed one a replaced document is removed from.
    assert loaded and max(loaded) <= 2
    assert len(index._graph._segments) >= 3
    assert all(s.index is None for s in index._graph._segments)  # after add, none loaded or even mapped
    index.search("anything", k=3, mode="vector", ann=True)  # search maps them (read-only) when it needs them
    assert all(s.index is not None and not s.writable for s in index._graph._segments)


def test_a_crash_before_the_graph_save_is_healed(tmp_path, small_segments, monkeypatch):
    index, files = _build_incrementally(tmp_path, monkeypatch)
    before = _graph_keys(index)

    def crash(graph, generation):
        raise KeyboardInterrupt  # the process dies after the database commit, before the graph is saved

    monkeypatch.setattr(ann.AnnGraph, "save", crash)
    _doc(files[0], 200, "d0v2")
    with pytest.raises(KeyboardInterrupt):
        index.add([files[0]])
    index.close()
    monkeypatch.undo()
    assert np.array_equal(_graph_keys(index), before)  # the saved graph is the one before the add

    reopened = Index(index.path, HashEmbedder(), ann_threshold=1000)
    text = _paragraph("d0v2", 3)
    assert reopened.search(text, k=1, mode="vector")[0].text == text  # healed on first use
    assert np.array_equal(_graph_keys(reopened), reopened.db.chunk_ids())


def test_a_damaged_segment_file_is_rebuilt(tmp_path, small_segments, monkeypatch):
    index, _ = _build_incrementally(tmp_path, monkeypatch)
    index.close()
    segment = sorted(index._graph_folder.glob("seg-*.usearch"))[0]
    segment.write_bytes(b"\0" * 100)
    reopened = Index(index.path, HashEmbedder(), ann_threshold=1000)
    reopened.search("anything", k=3, mode="vector")
    assert np.array_equal(_graph_keys(reopened), reopened.db.chunk_ids())


def test_an_older_single_file_graph_is_replaced(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    file = _doc(docs / "a.txt", 50, "a")
    legacy = tmp_path / "i.sqlite.usearch"
    legacy.write_bytes(b"an llmos 0.x graph")
    (tmp_path / "i.sqlite.usearch.json").write_text('{"generation": 1, "dim": 32}')
    index = Index(tmp_path / "i.sqlite", HashEmbedder(), ann_threshold=10)
    index.add([file])
    assert legacy.is_dir() and not (tmp_path / "i.sqlite.usearch.json").exists()
    assert np.array_equal(_graph_keys(index), index.db.chunk_ids())
    shutil.rmtree(legacy)


def test_streamed_exact_search_equals_one_matrix_product():
    from llmos.tasks.index import exact_search, exact_search_blocks

    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((1000, DIM)).astype(np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    ids = rng.permutation(5000)[:1000].astype(np.int64)
    queries = matrix[:5] + 0.1 * rng.standard_normal((5, DIM)).astype(np.float32)
    whole = exact_search(matrix, ids, queries, 10)
    blocks = [(ids[i:i + 37], matrix[i:i + 37]) for i in range(0, 1000, 37)]  # blocks smaller and larger than n
    streamed = exact_search_blocks(blocks, queries, 10)
    assert [[c for c, _ in r] for r in streamed] == [[c for c, _ in r] for r in whole]
    scores = queries @ matrix.T
    assert [c for c, _ in whole[0]] == [int(ids[i]) for i in np.argsort(-scores[0])[:10]]
