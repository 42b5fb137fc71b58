"""Question-answering evaluation: how often `ask` is right, cites the right file, declines, loops.

A question set is JSON Lines, one object per question:

    {"question": "How long does a licensee have to cure a violation?", "answers": ["\\b(30|thirty)\\b"], "source": "gpl-3.txt"}
    {"question": "What does the license cost?", "answers": [], "source": null}      # not answerable

`answers` are regexes searched case-insensitively in the answer text (not in the sources it lists);
`source` (a name, a list of names, or null) names the documents that state the answer, matched as in
`llmos eval retrieval`. A question with no `answers` is not answerable from the documents: the right
outcome is a decline.

Per set: correct, correct with the right source cited, declined (on answerable questions: false
declines), answers that ran to the token cap or a loop, declines on unanswerable questions, median
seconds per question. The shipped development sets are in `llmos/data/eval/qa/` (see its README):
each `NAME.jsonl` has its documents in the folder `NAME/` beside it, or, for `pydoc.jsonl`, in
Python's own `pydoc_data` topics.
"""

from __future__ import annotations

import os
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmos.errors import LlmosError
from llmos.files import json_lines
from llmos.tasks.evaluate_retrieval import is_relevant

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "data" / "eval" / "qa"


@dataclass(frozen=True)
class QAItem:
    question: str
    answers: tuple[str, ...]  # regexes; empty: not answerable
    sources: tuple[str, ...]

    @property
    def answerable(self) -> bool:
        return bool(self.answers)


@dataclass
class QAOutcome:
    question: str
    answer: str
    answerable: bool
    correct: bool
    cited_right: bool
    declined: bool
    looped: bool  # the answer shown ran to the token cap or into a loop
    replaced_loop: bool  # the model's answer did, and a quoted sentence was shown instead
    extractive: bool
    model_answer: str | None
    top_score: float | None  # the best evidence sentence's rank score (what the decline threshold reads)
    seconds: float


@dataclass
class QAReport:
    name: str
    outcomes: list[QAOutcome] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        answerable = [o for o in self.outcomes if o.answerable]
        other = [o for o in self.outcomes if not o.answerable]
        return {
            "set": self.name, "answerable": len(answerable),
            "correct": sum(o.correct for o in answerable),
            "correct_cited": sum(o.correct and o.cited_right for o in answerable),
            "declined": sum(o.declined for o in answerable),
            "extractive": sum(o.extractive for o in answerable),
            "looped": sum(o.looped for o in self.outcomes),
            "replaced_loops": sum(o.replaced_loop for o in self.outcomes),
            "unanswerable": len(other), "unanswerable_declined": sum(o.declined for o in other),
            "median_seconds": round(statistics.median(o.seconds for o in self.outcomes), 3) if self.outcomes else None,
        }

    def as_dict(self) -> dict[str, Any]:
        return {"summary": self.summary(), "outcomes": [asdict(o) for o in self.outcomes]}


def load_items(path: str | os.PathLike[str]) -> list[QAItem]:
    path = Path(path)
    if not path.is_file():
        raise LlmosError(f"no such question file: {path}")
    items = []
    for number, row in json_lines(path):
        try:
            answers = row.get("answers", [])
            answers = [answers] if isinstance(answers, str) else list(answers)
            for a in answers:
                re.compile(a)
            sources = row.get("sources", row.get("source"))
            sources = [] if sources is None else [sources] if isinstance(sources, str) else list(sources)
            if not isinstance(row["question"], str) or not row["question"].strip():
                raise ValueError("needs a non-empty question")
        except re.error as exc:
            raise LlmosError(f"{path}:{number}: an answer is not a valid regex ({exc})") from None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise LlmosError(f"{path}:{number}: not a question line ({exc}); expected "
                             '{"question": "...", "answers": ["regex"], "source": "file.txt"}') from None
        items.append(QAItem(row["question"], tuple(str(a) for a in answers), tuple(str(s) for s in sources)))
    if not items:
        raise LlmosError(f"{path} has no questions")
    return items


def corpus_of(path: str | os.PathLike[str], home: Path) -> Path | None:
    """The documents a question file is about, when it names them by place: the folder `NAME/` beside
    `NAME.jsonl`, or Python's pydoc topics (written out under `home`) for a file named `pydoc*.jsonl`."""
    path = Path(path)
    folder = path.with_suffix("")
    if folder.is_dir():
        return folder
    if path.stem.startswith("pydoc"):
        from llmos.tasks.evaluate_retrieval import write_pydoc_corpus

        return write_pydoc_corpus(home / "pydoc_topics")
    return None


def judge(item: QAItem, answer: Any, seconds: float) -> QAOutcome:
    """Score one `Answer` from `llmos.tasks.qa.ask` against its item."""
    text = str(answer)
    declined = not answer.found
    correct = item.answerable and not declined and any(re.search(a, text, re.I) for a in item.answers)
    cited_right = correct and any(is_relevant(s.path, item.sources) for s in answer.cited)
    # What the user sees: a model answer that ran away was replaced by a quoted sentence (counted apart).
    looped = answer.finish_reason in ("length", "repetition") and not getattr(answer, "extractive", False)
    replaced = answer.finish_reason in ("length", "repetition") and getattr(answer, "extractive", False)
    return QAOutcome(item.question, text, item.answerable, correct, cited_right, declined, looped, replaced,
                     bool(getattr(answer, "extractive", False)), getattr(answer, "model_answer", None), _top_score(answer), round(seconds, 3))


def _top_score(answer: Any) -> float | None:
    shown = getattr(answer, "sources", None) or getattr(answer, "nearest", None)
    return round(shown[0].score, 4) if shown else None


def evaluate(answer: Callable[[str], Any], items: Sequence[QAItem], name: str,
             progress: Callable[[int, int], None] | None = None) -> QAReport:
    """Ask every question with `answer(question) -> Answer` and judge it."""
    report = QAReport(name)
    for i, item in enumerate(items):
        start = time.perf_counter()
        result = answer(item.question)
        report.outcomes.append(judge(item, result, time.perf_counter() - start))
        if progress:
            progress(i + 1, len(items))
    return report


def format_report(report: QAReport) -> str:
    s = report.summary()
    n = s["answerable"] or 1
    return "\n".join([
        f"{s['set']}: {s['answerable']} answerable, {s['unanswerable']} unanswerable questions",
        f"  correct                  {s['correct']:>4} / {s['answerable']}  ({100 * s['correct'] / n:.0f}%)",
        f"  correct, right source    {s['correct_cited']:>4} / {s['answerable']}",
        f"  declined (answerable)    {s['declined']:>4} / {s['answerable']}",
        f"  quoted a sentence        {s['extractive']:>4} / {s['answerable']}",
        f"  ran to the cap or looped {s['looped']:>4}   (model answers that did, replaced by a quote: {s['replaced_loops']})",
        f"  declined (unanswerable)  {s['unanswerable_declined']:>4} / {s['unanswerable']}",
        f"  median seconds           {s['median_seconds']}",
    ])
