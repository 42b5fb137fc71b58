"""Ingestion fuzzing: Hypothesis writes folders of hostile or careless files (random bytes, invalid
UTF-8, huge lines, deeply nested Markdown, HTML soup, fake PDFs, symlink loops) and indexes them again
and again into one index. Every file is indexed or refused in one line (named files: an LlmosError;
inside a folder: a one-line entry in `report.failed`), nothing else is raised, and SQLite's
integrity_check passes afterwards. Chunks are measured with the real MiniLM tokenizer; the vectors
come from a stub (the model's speed is not what is under test)."""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmos.errors import LlmosError
from llmos.tasks.index import Index

EXAMPLES = 150
STATS = {"cases": 0, "files": 0, "indexed": 0, "failed": 0, "refused": 0}


class TokenizerOnlyEmbedder:
    name, fingerprint, dim = "stub-minilm", "stub-minilm", 8

    def __init__(self, tokenizer, max_tokens: int) -> None:
        self.tokenizer, self.max_tokens, self.path = tokenizer, max_tokens, None

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    def embed(self, texts, batch_size=32):
        class Out:
            truncated = [i for i, t in enumerate(texts) if self.count_tokens(t) > self.max_tokens]
            vectors = np.random.default_rng(len(texts)).standard_normal((len(texts), 8)).astype(np.float32)
        return Out()


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    from llmos import store
    from llmos.tokenizer import Tokenizer

    folder = store.pull(store.DEFAULT_EMBED_MODEL, quiet=True)
    embedder = TokenizerOnlyEmbedder(Tokenizer.from_dir(folder), 128)
    path = tmp_path_factory.mktemp("fuzz-index") / "index.sqlite"
    with Index(path, embedder) as index:
        yield index
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("PRAGMA foreign_key_check").fetchall() == []
    print(f"ingestion fuzzing: {STATS}")


def nested_markdown(depth: int, fill: str) -> str:
    lines = []
    for i in range(depth):
        lines += ["#" * (i % 6 + 1) + " " + fill, "  " * i + "- " + fill, ">" * (i + 1) + " " + fill]
        if i % 7 == 0:
            lines.append("```" if i % 14 == 0 else "~~~")  # fences left open as often as closed
    return "\n".join(lines)


text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=300)
contents = st.one_of(
    st.binary(max_size=2000),                                                        # random bytes
    st.binary(max_size=500).map(lambda b: b"text " + b + b"\xff\xfe\xc3(more)"),     # invalid UTF-8
    st.tuples(st.integers(1000, 100_000), st.sampled_from(["a", "word ", "\u00e9", "\U0001F600", "x."])).map(
        lambda t: (t[1] * (t[0] // len(t[1]))).encode()),                           # one huge line
    st.tuples(st.integers(1, 400), text).map(lambda t: nested_markdown(*t).encode()),  # nested Markdown
    st.tuples(text, st.binary(max_size=400)).map(lambda t: b"%PDF-1.4\n" + t[0].encode() + t[1]),  # fake PDF
    text.map(lambda t: f"<html><h1>{t}<p><div><h2>{t}</p></h9><script>{t}".encode()),  # HTML soup
    text.map(str.encode),
)
files = st.lists(st.tuples(st.sampled_from(["a.txt", "b.md", "c.html", "d.pdf", "LICENSE", "e.rst", "f.log",
                                            "sub/g.md", ".hidden/h.txt"]), contents), min_size=1, max_size=4)


@settings(max_examples=EXAMPLES, deadline=30_000, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(files=files, loop=st.booleans())
def test_any_folder_is_indexed_or_refused_in_one_line(index, tmp_path_factory, files, loop):
    folder = tmp_path_factory.mktemp("docs")
    try:
        for name, data in files:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)
        if loop:
            os.symlink(folder, folder / "sub-loop")  # a folder that contains itself
            os.symlink(folder / "self-link", folder / "self-link")
        report = index.add([folder])
        STATS["cases"] += 1
        STATS["files"] += len(files)
        STATS["indexed"] += len(report.added) + len(report.updated) + len(report.unchanged)
        STATS["failed"] += len(report.failed)
        for path, reason in report.failed:
            assert reason and "\n" not in reason, (path, reason)
        for name, _ in files:  # each file named on its own: indexed, or one LlmosError line
            try:
                index.add([folder / name])
            except LlmosError as exc:
                STATS["refused"] += 1
                assert "\n" not in str(exc), str(exc)
        assert len(index) >= 0 and index.search("word", k=3, mode="keyword") is not None
    finally:
        shutil.rmtree(folder, ignore_errors=True)
