"""The command line: index add/list/stats/remove, search, embed, and `llmos eval retrieval` on the
shipped question set."""

from __future__ import annotations

import json
import re

from llmos.cli.main import main
from llmos.tasks.evaluate_retrieval import SHIPPED_QA, load_questions


def test_index_commands(tmp_path, fixture_docs, embed_model_path, capsys):
    index = str(tmp_path / "cli.sqlite")
    assert main(["search", "coffee", "--index", index]) == 1  # no index yet: one-line error
    assert "no index at" in capsys.readouterr().err
    assert main(["index", "add", str(fixture_docs), "--index", index, "-q", "--embed-model", str(embed_model_path)]) == 0
    assert "4 added" in capsys.readouterr().out
    assert main(["index", "add", str(fixture_docs), "--index", index, "-q"]) == 0
    assert "0 chunks embedded" in capsys.readouterr().out
    assert main(["search", "who descales the coffee machine", "--index", index, "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("1. ") and "office.html:4-5" in out.splitlines()[0] and "Marta" in out
    assert main(["search", "quarterly revenue", "--index", index, "--mode", "keyword", "--json"]) == 0
    first = json.loads(capsys.readouterr().out.splitlines()[0])
    assert first["path"].endswith("report.pdf") and first["page"] == 1
    assert main(["index", "stats", "--index", index, "--check-ann"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"documents\s+4", out) and re.search(r"ANN recall@10\s+\d\.\d{3}", out)
    assert main(["index", "list", "--index", index]) == 0
    assert len([line for line in capsys.readouterr().out.splitlines() if " chunks " in line]) == 4
    assert main(["index", "remove", str(fixture_docs / "guide.md"), "--index", index]) == 0
    assert main(["index", "list", "--index", index]) == 0
    out = capsys.readouterr().out
    assert out.startswith("removed ") and out.splitlines()[0].endswith("guide.md")
    listed = [line for line in out.splitlines() if " chunks " in line]
    assert len(listed) == 3 and not any("guide.md" in line for line in listed)


def test_embed_command(embed_model_path, capsys):
    assert main(["embed", "hello world", "--model", str(embed_model_path)]) == 0
    row = json.loads(capsys.readouterr().out)
    assert len(row["embedding"]) == 384 and row["truncated"] is False and row["tokens"] == 4


def test_eval_retrieval_on_the_shipped_set(capsys):
    assert len(load_questions(SHIPPED_QA)) >= 40
    assert main(["eval", "retrieval", str(SHIPPED_QA)]) == 0
    out = capsys.readouterr().out
    print(out)
    header = out.splitlines()[1].split()
    assert header == ["mode", "recall@1", "recall@3", "recall@10", "MRR", "questions"]
    rows = {line.split()[0]: [float(x) for x in line.split()[1:5]] for line in out.splitlines()[2:]}
    assert set(rows) == {"vector", "keyword", "hybrid"}
    for mode, (r1, r3, r10, mrr) in rows.items():
        assert 0 <= r1 <= r3 <= r10 <= 1 and r1 <= mrr <= r10
    assert rows["hybrid"][2] >= 0.8  # a broken retriever would not find most answers in the top 10
