"""Retrieval evaluation: recall@1/5/10 and MRR of each search mode on a question set.

A question set is JSON Lines, one object per question:

    {"question": "When does the finally clause of a try statement run?", "sources": ["try.txt", "compound.txt"]}

`sources` (or a single `source`) names the documents that answer it: a result counts as relevant when
its path equals one, ends with "/" + one, or has it as its file name or stem. Each question's rank is
that of its first relevant result among the top `k` (10); recall@n is the fraction of questions ranked
n or better, MRR the mean of 1/rank (0 when none is found).

The shipped set, `llmos/data/pydoc_qa.jsonl`, asks questions of the Python language reference topics
that every Python carries in `pydoc_data.topics`; `write_pydoc_corpus(folder)` writes those topics out
as one text file each (`try.txt`, ...) so they can be indexed like any documents.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from llmos.errors import LlmosError
from llmos.files import json_lines
from llmos.tasks.index import MODES, Index, SearchResult

SHIPPED_QA = Path(__file__).resolve().parent.parent / "data" / "pydoc_qa.jsonl"
CUTOFFS = (1, 5, 10)


@dataclass(frozen=True)
class Question:
    question: str
    sources: tuple[str, ...]


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
            sources = [sources] if isinstance(sources, str) else list(sources)
            if not isinstance(row["question"], str) or not row["question"].strip() or not sources:
                raise ValueError("needs a non-empty question and at least one source")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:  # fields missing or of the wrong kind
            raise LlmosError(f"{path}:{number}: not a question line ({exc}); expected "
                             '{"question": "...", "sources": ["file.txt"]}') from None
        questions.append(Question(row["question"], tuple(str(s) for s in sources)))
    if not questions:
        raise LlmosError(f"{path} has no questions")
    return questions


def is_relevant(path: str, sources: Sequence[str]) -> bool:
    p = Path(path)
    return any(path == s or path.endswith("/" + s.lstrip("/")) or p.name == s or p.stem == s for s in sources)


def first_relevant(results: Sequence[SearchResult], sources: Sequence[str]) -> int | None:
    return next((r.rank for r in results if is_relevant(r.path, sources)), None)


def evaluate(index: Index, questions: Sequence[Question], modes: Sequence[str] = MODES) -> dict[str, RetrievalScores]:
    """Scores of each mode on `questions` against `index`."""
    if not len(index):
        raise LlmosError(f"{index.path} is empty: add the documents the questions are about first")
    depth = max(CUTOFFS)
    scores = {}
    for mode in modes:
        ranks = [first_relevant(index.search(q.question, k=depth, mode=mode), q.sources) for q in questions]
        recall = {n: sum(1 for r in ranks if r is not None and r <= n) / len(ranks) for n in CUTOFFS}
        mrr = sum(1.0 / r for r in ranks if r is not None) / len(ranks)
        scores[mode] = RetrievalScores(mode, len(ranks), recall, mrr, ranks)
    return scores


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
