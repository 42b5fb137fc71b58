"""Retrieval evaluation: recall@1/3/10 and MRR of each search mode on a question set.

A question set is JSON Lines, one object per question:

    {"question": "When does the finally clause of a try statement run?", "sources": ["try.txt", "compound.txt"]}
    {"question": "...", "answers": ["jan(uary)? 2004"], "source": "apache-2.0.txt"}

`sources` (or a single `source`) names the documents that answer it: a result counts as relevant when
its path equals one, ends with "/" + one, or has it as its file name or stem, and, when the question
has `answers` (regular expressions, as the QA sets in llmos/data/eval/qa/ have), when its passage
also matches one of them: the passage that holds the answer, not just its document. Questions whose
source is null (unanswerable ones) are skipped. Each question's rank is that of its first relevant
result among the top 10; recall@n is the fraction of questions ranked n or better, MRR the mean of
1/rank (0 when none is found).

`tune_fusion` scores the hybrid fusion's parameters (RRF k, the vector list's weight) on candidate
lists fetched once per question; `SHIPPED_SETS` are the development sets it was tuned on.

The shipped set, `llmos/data/pydoc_qa.jsonl`, asks questions of the Python language reference topics
that every Python carries in `pydoc_data.topics`; `write_pydoc_corpus(folder)` writes those topics out
as one text file each (`try.txt`, ...) so they can be indexed like any documents.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from llmos.errors import LlmosError
from llmos.files import json_lines
from llmos.tasks.index import MODES, RRF_K, VECTOR_WEIGHT, Index, SearchResult, fuse

SHIPPED_QA = Path(__file__).resolve().parent.parent / "data" / "pydoc_qa.jsonl"
QA_DIR = SHIPPED_QA.parent / "eval" / "qa"
SHIPPED_SETS = (SHIPPED_QA, QA_DIR / "licenses.jsonl", QA_DIR / "readmes.jsonl", QA_DIR / "pydoc.jsonl")
CUTOFFS = (1, 3, 10)


@dataclass(frozen=True)
class Question:
    question: str
    sources: tuple[str, ...]
    answers: tuple[str, ...] = ()  # regexes a relevant passage must match (any), when given


@dataclass(frozen=True)
class RetrievalScores:
    mode: str
    questions: int
    recall: dict[int, float]  # cutoff -> recall@cutoff
    mrr: float
    ranks: list[int | None]  # per question, 1-based, None when not in the top max(CUTOFFS)


def load_questions(path: str | os.PathLike[str] = SHIPPED_QA) -> list[Question]:
    path = Path(path)
    if not path.is_file():
        raise LlmosError(f"no such question file: {path}")
    questions = []
    for number, row in json_lines(path):
        try:
            sources = row.get("sources", row.get("source"))
            if sources is None and "answers" in row:  # an unanswerable question of a QA set
                continue
            sources = [sources] if isinstance(sources, str) else list(sources)
            answers = row.get("answers") or []
            answers = [answers] if isinstance(answers, str) else [str(a) for a in answers]
            for a in answers:
                re.compile(a)
            if not isinstance(row["question"], str) or not row["question"].strip() or not sources:
                raise ValueError("needs a non-empty question and at least one source")
        except re.error as exc:
            raise LlmosError(f"{path}:{number}: an answer is not a valid regex ({exc})") from None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:  # fields missing or of the wrong kind
            raise LlmosError(f"{path}:{number}: not a question line ({exc}); expected "
                             '{"question": "...", "sources": ["file.txt"]}') from None
        questions.append(Question(row["question"], tuple(str(s) for s in sources), tuple(answers)))
    if not questions:
        raise LlmosError(f"{path} has no questions")
    return questions


def is_relevant(path: str, sources: Sequence[str]) -> bool:
    p = Path(path)
    return any(path == s or path.endswith("/" + s.lstrip("/")) or p.name == s or p.stem == s for s in sources)


def holds_answer(text: str, answers: Sequence[str]) -> bool:
    return not answers or any(re.search(a, text, re.IGNORECASE) for a in answers)


def first_relevant(results: Sequence[SearchResult], question: Question) -> int | None:
    return next((r.rank for r in results if is_relevant(r.path, question.sources) and holds_answer(r.text, question.answers)), None)


def _scores(mode: str, ranks: list[int | None]) -> RetrievalScores:
    recall = {n: sum(1 for r in ranks if r is not None and r <= n) / len(ranks) for n in CUTOFFS}
    mrr = sum(1.0 / r for r in ranks if r is not None) / len(ranks)
    return RetrievalScores(mode, len(ranks), recall, mrr, ranks)


def evaluate(index: Index, questions: Sequence[Question], modes: Sequence[str] = MODES) -> dict[str, RetrievalScores]:
    """Scores of each mode on `questions` against `index`."""
    if not len(index):
        raise LlmosError(f"{index.path} is empty: add the documents the questions are about first")
    depth = max(CUTOFFS)
    scores = {}
    for mode in modes:
        ranks = [first_relevant(index.search(q.question, k=depth, mode=mode), q) for q in questions]
        scores[mode] = _scores(mode, ranks)
    return scores


def tune_fusion(sets: Sequence[tuple[Index, Sequence[Question]]], ks: Sequence[float] = (5, 10, 20, 30, 60, 100),
                weights: Sequence[float] = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0),
                pool: int = 50) -> list[tuple[float, float, list[RetrievalScores]]]:
    """Hybrid scores per (RRF k, vector weight) on each (index, questions) set, best mean MRR first.
    Each question's candidate lists are fetched once; only the fusion is re-run per setting."""
    fetched = []
    for index, questions in sets:
        lists = [index.candidates(q.question, pool) for q in questions]
        ids = {cid for vec, kw in lists for cid, _ in vec + kw}
        rows = index.db.chunk_rows(sorted(ids)) if ids else {}
        fetched.append((questions, lists, {cid: (r[1], r[2]) for cid, r in rows.items()}))
    out = []
    for k in ks:
        for w in weights:
            per_set = []
            for questions, lists, rows in fetched:
                ranks = []
                for q, (vec, kw) in zip(questions, lists):
                    top = [cid for cid, _ in fuse(vec, kw, k, w)[:max(CUTOFFS)]]
                    ranks.append(next((i + 1 for i, cid in enumerate(top)
                                       if is_relevant(rows[cid][0], q.sources) and holds_answer(rows[cid][1], q.answers)), None))
                per_set.append(_scores("hybrid", ranks))
            out.append((k, w, per_set))
    return sorted(out, key=lambda t: -sum(s.mrr for s in t[2]) / len(t[2]))


def current_fusion() -> tuple[float, float]:
    return RRF_K, VECTOR_WEIGHT


def format_table(scores: dict[str, RetrievalScores]) -> str:
    header = f"{'mode':<8}" + "".join(f"{'recall@' + str(n):>11}" for n in CUTOFFS) + f"{'MRR':>8}{'questions':>11}"
    rows = [header]
    for s in scores.values():
        rows.append(f"{s.mode:<8}" + "".join(f"{s.recall[n]:>11.3f}" for n in CUTOFFS) + f"{s.mrr:>8.3f}{s.questions:>11}")
    return "\n".join(rows)


def write_pydoc_corpus(folder: str | os.PathLike[str]) -> Path:
    """Write `pydoc_data.topics` as `TOPIC.txt` files into `folder`; unchanged files are left alone,
    so re-indexing the folder embeds nothing new."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise LlmosError("this Python has no pydoc_data module, which the shipped evaluation set is built from") from None
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in topics.items():
        path = folder / f"{name}.txt"
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
    return folder
