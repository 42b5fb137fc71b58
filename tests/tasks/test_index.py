"""The search index: each mode finds the expected passage, incremental re-adds, removal, the model
guard, ANN recall, and crash safety under kill -9."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmos.errors import LlmosError
from llmos.tasks.index import MODES, Index


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_ranks_the_answer_first(fixture_index, queries, mode):
    for query, (file, phrase) in queries.items():
        top = fixture_index.search(query, k=3, mode=mode)[0]
        assert Path(top.path).name == file, (mode, query, top.location)
        assert phrase in " ".join(top.text.split())
        assert top.rank == 1


def test_results_carry_locations(fixture_index):
    hit = fixture_index.search("who descales the coffee machine", k=1)[0]
    assert hit.heading == ("Office information", "Kitchen")
    assert hit.location.endswith("office.html:4-5")
    pdf = fixture_index.search("revenue in the third quarter", k=1, mode="keyword")[0]
    assert pdf.page == 1 and pdf.location.endswith("report.pdf p.1")


def test_readding_unchanged_files_embeds_nothing(fixture_index, fixture_docs):
    report = fixture_index.add([fixture_docs])
    assert report.embedded == 0 and not report.added and not report.updated
    assert len(report.unchanged) == 4


def test_update_remove_and_prune(tmp_path, fixture_docs, embedder):
    docs = shutil.copytree(fixture_docs, tmp_path / "docs")
    index = Index(tmp_path / "i.sqlite", embedder)
    index.add(docs)
    chunks_before = len(index)
    (docs / "guide.md").write_text("# Deployment guide\n\n## Database backups\n\nBackups now run hourly.\n")
    report = index.add(docs)
    assert [Path(p).name for p in report.updated] == ["guide.md"] and len(report.unchanged) == 3
    assert report.embedded == 1
    assert "hourly" in index.search("how often do backups run", k=1)[0].text
    assert not index.search("central log cluster", k=5, mode="keyword")  # the old version is gone
    (docs / "notes.txt").unlink()
    report = index.add(docs)
    assert [Path(p).name for p in report.removed] == ["notes.txt"]
    assert index.remove([docs / "office.html"]) == [str((docs / "office.html").resolve())]
    assert sorted(Path(d.path).name for d in index.documents()) == ["guide.md", "report.pdf"]
    assert len(index) < chunks_before
    with pytest.raises(LlmosError, match="not in the index"):
        index.remove([docs / "office.html"])
    index.remove([docs])
    assert len(index) == 0 and index.search("backups", k=3) == []


def test_refuses_another_embedding_model(fixture_index):
    class OtherModel:
        name, fingerprint = "some-other-model", "0123456789abcdef"

    with pytest.raises(LlmosError, match="was built with embedding model"):
        Index(fixture_index.path, OtherModel())


def test_bad_input_errors(fixture_index, tmp_path):
    with pytest.raises(LlmosError, match="empty"):
        fixture_index.search("   ")
    with pytest.raises(LlmosError, match="mode"):
        fixture_index.search("coffee", mode="fuzzy")
    with pytest.raises(LlmosError, match="no such file"):
        fixture_index.add([tmp_path / "missing.md"])
    (tmp_path / "slides.pptx").write_bytes(b"PK")
    with pytest.raises(LlmosError, match="unsupported file type"):
        fixture_index.add([tmp_path / "slides.pptx"])
    (tmp_path / "other.sqlite").write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(LlmosError):
        Index(tmp_path / "other.sqlite")


def test_ann_past_threshold_agrees_with_exact(tmp_path, fixture_docs, embedder):
    index = Index(tmp_path / "ann.sqlite", embedder, ann_threshold=5)
    index.add(fixture_docs)
    assert len(index) >= 5
    for query in ("how do I rotate the api key", "visitors parking garage"):
        exact = [r.chunk_id for r in index.search(query, k=3, mode="vector", ann=False)]
        approx = [r.chunk_id for r in index.search(query, k=3, mode="vector")]  # past the threshold: ANN
        assert approx == exact
    assert Path(f"{index.path}.usearch").is_dir()  # the graph's segments and manifest
    stats = index.stats()
    assert stats.ann == "usearch" and stats.ann_recall_at_10 is not None and stats.ann_recall_at_10 >= 0.9
    # The ANN cache follows removals.
    index.remove([fixture_docs / "notes.txt"])
    assert all(Path(r.path).name != "notes.txt" for r in index.search("rotate the api key", k=5, mode="vector"))


def _doc_count(path: Path) -> int:
    try:
        with sqlite3.connect(path, timeout=1) as db:
            return db.execute("SELECT count(*) FROM documents").fetchone()[0]
    except sqlite3.Error:  # not created yet
        return 0


def test_kill_9_during_add_leaves_a_usable_index(tmp_path, embedder, embed_model_path):
    docs = tmp_path / "many"
    docs.mkdir()
    n = 80
    for i in range(n):  # small documents, embedded 32 at a time and committed one by one
        (docs / f"note{i:02d}.md").write_text(f"# Note {i}\n\nNote {i} is filed under drawer {i * 31 % 97}.\n")
    index_path = tmp_path / "crash.sqlite"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "llmos", "index", "add", str(docs), "--index", str(index_path), "-q",
           "--embed-model", str(embed_model_path)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while _doc_count(index_path) < 1 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, f"index add ended before it could be killed: {proc.stderr.read().decode()[-500:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL

    with sqlite3.connect(index_path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    index = Index(index_path, embedder)
    stats = index.stats()
    present = stats.documents
    assert 1 <= present < n
    assert stats.chunks == sum(d.chunks for d in index.documents())  # no half-written document
    hit = index.search("which drawer is note 1 filed under", k=1)[0]
    assert Path(hit.path).name in {Path(d.path).name for d in index.documents()}

    report = index.add(docs)
    assert len(report.unchanged) == present and len(report.added) == n - present
    assert index.stats().documents == n


@pytest.mark.parametrize("ann", [False, True])
def test_hybrid_search_embedding_beside_the_keyword_side_finds_what_it_finds_in_turn(fixture_index, ann, monkeypatch):
    import torch

    index = Index(fixture_index.path, fixture_index.embedder)
    index.search("warm the embedder up", k=1)  # its first batch tells whether its forward runs natively
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # earlier tests may have left 1 (llmos.load's choice on a busy machine)
    try:
        assert index.embedder.native is True and index._beside()
        queries = ["who descales the coffee machine", "revenue in the third quarter", "how do I rotate the api key"]
        beside = []
        for q in queries:
            index._query_vectors.clear()
            beside.append([(r.chunk_id, r.score) for r in index.search(q, k=5, ann=ann)])
    finally:
        torch.set_num_threads(threads)
    assert index._pool is not None  # the worker thread ran them
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert not index._beside()
    for q, got in zip(queries, beside):
        index._query_vectors.clear()
        assert [(r.chunk_id, r.score) for r in index.search(q, k=5, ann=ann)] == got
    index.close()
    assert index._pool is None
