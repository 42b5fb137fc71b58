"""Retrieval evaluation: QA sets load with their answer patterns (unanswerable questions skipped), a
result is relevant only when its passage holds the answer, and the hybrid fusion weighs its lists."""

from __future__ import annotations

import json

from llmos.tasks import evaluate_retrieval as ev
from llmos.tasks.index import SearchResult, fuse


def _result(rank: int, path: str, text: str) -> SearchResult:
    return SearchResult(rank, 0.0, None, path, text, (), 1, 1, 0, len(text), None, rank)


def test_a_qa_set_loads_its_answerable_questions_with_their_patterns():
    rows = [json.loads(line) for line in ev.SHIPPED_SETS[1].read_text().splitlines() if line.strip()]
    questions = ev.load_questions(ev.SHIPPED_SETS[1])
    answerable = [r for r in rows if r["source"] is not None]
    assert len(questions) == len(answerable) < len(rows)
    assert all(q.answers for q in questions) and questions[0].answers == tuple(answerable[0]["answers"])


def test_relevant_means_the_right_document_and_a_passage_holding_the_answer():
    q = ev.Question("When was the Apache License 2.0 issued?", ("apache-2.0.txt",), (r"jan(uary)?\.?,?\s+2004",))
    results = [
        _result(1, "/docs/mit.txt", "Issued January 2004 somewhere else."),  # the answer, the wrong document
        _result(2, "/docs/apache-2.0.txt", "TERMS AND CONDITIONS FOR USE"),  # the document, not the passage
        _result(3, "/docs/apache-2.0.txt", "Apache License, Version 2.0, January 2004"),
    ]
    assert ev.first_relevant(results, q) == 3
    assert ev.first_relevant(results, ev.Question(q.question, q.sources)) == 2  # no patterns: the document is enough


def test_fusion_weighs_the_vector_list_against_the_keyword_list():
    vector, keyword = [(1, 0.9), (2, 0.8)], [(3, 5.0), (2, 4.0)]
    assert fuse(vector, keyword, k=10, vector_weight=1.0)[0][0] == 2  # in both lists: first
    tied = dict(fuse(vector, keyword, k=10, vector_weight=1.0))
    assert tied[1] == tied[3]  # each first in one list, equal weights
    weighted = dict(fuse(vector, keyword, k=10, vector_weight=0.5))
    assert weighted[3] > weighted[1] and weighted[3] == 1 / 11 and weighted[1] == 0.5 / 11
    assert [cid for cid, _ in fuse(vector, [], k=10, vector_weight=0.5)] == [1, 2]  # no keyword hits: vector order
