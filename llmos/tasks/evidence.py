"""Evidence for grounded answers: sentences with their locations, ranked for a question, and the
check that an answer says nothing its evidence does not.

    sentences = [s for i, r in enumerate(results) for s in sentences_of(r, i)]
    ranked = rank(question, sentences, embedder)          # best first, each with its score parts
    supported(answer_text, [s.text for s in used])         # numbers, names, quoted terms all found?

Pure text functions, plus one call to an embedding model in `rank`; no chat model. The question-
answering pipeline (`llmos.tasks.qa`) and the faithful summaries (`llmos.tasks.summarize`) build on
them.

- `split_sentences(text)` gives character spans: paragraphs (blank lines), list items, Markdown
  headings and table rows start new units; inside a unit, a sentence ends at . ! or ? followed by
  space and a capital, digit or quote, except after common abbreviations and initials. Very short
  pieces ("4. Redistribution.") join the next sentence of their paragraph; very long ones split at "; ".
- `rank` scores each sentence by cosine similarity to the question (the embedding model), weighted
  overlap of the question's content words (IDF over the candidates, light stemming), whether the
  sentence holds the kind of thing the question asks for (a number for "how many", a name for "who",
  an exception class for "which exception"), and the rank of the passage it came from. The weights were tuned on the shipped development sets
  (`llmos/data/eval/qa/`), never on one alone.
- `supported(answer, evidence, question)` is True when every number, name (a capitalised word not
  opening a sentence), quoted or code term of the answer occurs in the evidence, and so do most of the
  answer's content words that the question does not already hold (there must be some).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llmos.tasks.index import format_location

if TYPE_CHECKING:
    from llmos.tasks.index import SearchResult

STOPWORDS = frozenset(
    "a an and are as at be been being but by can could did do does doing done for from had has have how i if "
    "in into is it its itself me more most my no nor not of on once only or other our out over own same she "
    "should so some such than that the their them then there these they this those through to too under "
    "until up very was we were what when where which while who whom why will with would you your yours "
    "about above after again against all am any because before below between both down during each few "
    "further he her here hers him his off ours s t just also may must shall".split()
)
_ABBREVIATIONS = frozenset(
    "e.g i.e etc vs mr mrs ms dr prof inc ltd co corp no nos sec art fig approx cf al jr sr st u.s u.k "
    "p.m a.m ca vol ed eds jan feb mar apr jun jul aug sep sept oct nov dec".split()
)
_UNIT_START = re.compile(r"\n[ \t]*\n|\n(?=[ \t]*(?:[-*+•][ \t]|\d{1,3}[.)][ \t]|#{1,6}[ \t]|\|))")
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9]|\([a-z0-9]{1,3}\)\s)")
LIST_MARKER = re.compile(r"^\s*(?:[-*+\u2022\u2013]|\d{1,3}[.)])\s+")
_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9_'-]*")
_NUMBER = re.compile(r"\d+(?:[.,:]\d+)*")
_EXCEPTION = re.compile(r"\b[A-Z]\w*(?:Error|Exception|Warning)\b")  # ValueError, idna.IDNABidiError
_NUMBER_WORDS = frozenset(
    "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred thousand "
    "million billion once twice half".split()
)
MIN_SENTENCE_CHARS = 25
MAX_SENTENCE_CHARS = 400


@dataclass(frozen=True)
class Sentence:
    """One sentence of a retrieved passage, with where it is. `passage`: the passage's rank (0 = best)."""

    text: str  # whitespace folded to single spaces
    path: str
    heading: tuple[str, ...]
    line_start: int
    line_end: int
    page: int | None
    passage: int
    position: int  # the sentence's index in its passage

    @property
    def location(self) -> str:
        """`path:12-14`, or `path p.3` for a PDF page (as search results are shown)."""
        return format_location(self.path, self.page, self.line_start, self.line_end)


@dataclass(frozen=True)
class Ranked:
    """A sentence and its score for a question, with the parts the score is made of."""

    sentence: Sentence
    score: float
    similarity: float  # cosine with the question
    overlap: float  # IDF-weighted share of the question's content words it contains
    kind: float  # 1 when it holds what the question asks for (a number, a name, ...), else 0
    named: float  # 1 when the question names the sentence's document ("... under the GPL?", gpl-3.txt)


# --- sentences --------------------------------------------------------------------------------------


def split_sentences(text: str) -> list[tuple[int, int]]:
    """Character spans of the sentences of `text` (see the module doc), in order, stripped."""
    spans: list[tuple[int, int]] = []
    start = 0
    for m in [*_UNIT_START.finditer(text), None]:
        end = m.start() if m else len(text)
        # Short pieces join the next sentence of their own paragraph only: a heading stays apart.
        spans.extend(_merge_short(text, _split_unit(text, start, end)))
        start = m.end() if m else len(text)
    return spans


def _split_unit(text: str, start: int, end: int) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    cut = start
    for m in _SENTENCE_END.finditer(text, start, end):
        words = text[cut:m.start() + 1].split()
        last = words[-1].lower().rstrip(".!?\"')]").lstrip("(\"'[") if words else ""
        if last in _ABBREVIATIONS or re.fullmatch(r"[a-z]", last) or re.fullmatch(r"\d{1,3}", last) and len(words) == 1:
            continue  # "e.g. The", "J. Smith", a list number "3. The"
        spans.append((cut, m.start() + len(m.group().rstrip())))
        cut = m.end()
    spans.append((cut, end))
    out: list[tuple[int, int]] = []
    for s, e in spans:
        out.extend(_split_long(text, s, e))
    return [_strip(text, s, e) for s, e in out if text[s:e].strip()]


def _split_long(text: str, start: int, end: int) -> list[tuple[int, int]]:
    """A sentence over MAX_SENTENCE_CHARS splits after "; " (license clauses run to hundreds of words)."""
    if end - start <= MAX_SENTENCE_CHARS:
        return [(start, end)]
    out: list[tuple[int, int]] = []
    cut = start
    for m in re.finditer(r";\s+", text[start:end]):
        if start + m.start() - cut >= MIN_SENTENCE_CHARS * 2:
            out.append((cut, start + m.start() + 1))
            cut = start + m.end()
    out.append((cut, end))
    return out


def _strip(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _merge_short(text: str, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Join pieces too short to stand alone ("4. Redistribution.", "Section 2") to the sentence after."""
    out: list[tuple[int, int]] = []
    carry: int | None = None
    for s, e in spans:
        if carry is not None:
            s, carry = carry, None
        if e - s < MIN_SENTENCE_CHARS or len(text[s:e].split()) < 4:
            carry = s
            continue
        out.append((s, e))
    if carry is not None:
        if out:
            out[-1] = (out[-1][0], spans[-1][1])
        else:
            out.append((carry, spans[-1][1]))
    return out


def sentences_of(result: SearchResult, passage: int) -> list[Sentence]:
    """The sentences of one retrieved passage, with their lines (the passage's text is the file's own)."""
    text = result.text
    out = []
    for position, (s, e) in enumerate(split_sentences(text)):
        line_start = result.line_start + text.count("\n", 0, s)
        line_end = result.line_start + text.count("\n", 0, e)
        if result.page is None:
            line_end = min(line_end, max(result.line_end, line_start))
        out.append(Sentence(" ".join(text[s:e].split()), result.path, result.heading, line_start, line_end,
                            result.page, passage, position))
    return out


# --- words ------------------------------------------------------------------------------------------


def stem(word: str) -> str:
    """A light stemmer: enough to match "licenses"/"licensed"/"licensing" and "days"/"day"."""
    w = word.lower().strip("'-")
    for suffix in ("ations", "ation", "ings", "ing", "ies", "ied", "ed", "es", "s", "ly", "e"):
        if len(w) - len(suffix) >= 3 and w.endswith(suffix):
            return w[: -len(suffix)] + ("y" if suffix in ("ies", "ied") else "")
    return w


def content_words(text: str) -> list[str]:
    """Stemmed words of `text` that carry meaning (no stopwords), in order."""
    return [stem(w) for w in _WORD.findall(text) if w.lower() not in STOPWORDS]


def _asks_for(question: str) -> str | None:
    q = question.lower()
    if re.search(r"\bhow (many|much|long|old|often|far|big|large|soon)\b|\bwhat (year|percentage|percent|number|"
                 r"version|age|date|amount)\b|\bwhen\b|\bwhich (year|version)\b|\bhow (quickly|fast)\b", q):
        return "number"
    if re.search(r"\bwho\b|\bwhose\b|\bwhich (company|organi[sz]ation|person|group|foundation)\b", q):
        return "name"
    if re.search(r"\b(which|what)\b.*\b(exception|error|warning)s?\b", q):
        return "exception"
    return None


def _has_number(text: str) -> bool:
    return bool(_NUMBER.search(text)) or any(w.lower() in _NUMBER_WORDS for w in _WORD.findall(text))


def _has_exception(text: str) -> bool:
    return bool(_EXCEPTION.search(text))


def _has_name(text: str) -> bool:
    words = text.split()
    return any(w[:1].isupper() and i > 0 and not words[i - 1].endswith((".", ":")) for i, w in enumerate(words))


# --- ranking ----------------------------------------------------------------------------------------

# Tuned on the shipped development sets together (see the module doc and `llmos eval qa`).
WEIGHTS = {"similarity": 1.0, "overlap": 0.6, "kind": 0.08, "passage": 0.05, "named": 0.1}


def rank(question: str, sentences: Sequence[Sentence], embedder: Any,
         weights: dict[str, float] | None = None) -> list[Ranked]:
    """`sentences` best first for `question` (see the module doc). `embedder`: an Embedder (or any
    object with `embed(texts).vectors` and `embed_query(text)` giving unit vectors)."""
    if not sentences:
        return []
    w = {**WEIGHTS, **(weights or {})}
    texts = [f"{' > '.join(s.heading)}: {s.text}" if s.heading else s.text for s in sentences]
    vectors = np.asarray(embedder.embed(texts).vectors, dtype=np.float32)
    query = np.asarray(embedder.embed_query(question), dtype=np.float32)
    similarity = vectors @ query
    overlap = keyword_overlap(question, [s.text for s in sentences])
    wanted = _asks_for(question)
    has = {"number": _has_number, "name": _has_name, "exception": _has_exception}.get(wanted or "")
    asked = {x.lower() for x in _WORD.findall(question)} | set(content_words(question))
    ranked = []
    for i, s in enumerate(sentences):
        kind = 1.0 if has and has(s.text) else 0.0
        named = 1.0 if names_of(s.path) & asked else 0.0
        score = (w["similarity"] * float(similarity[i]) + w["overlap"] * overlap[i] + w["kind"] * kind
                 + w["passage"] / (1 + s.passage) + w["named"] * named)
        ranked.append(Ranked(s, score, float(similarity[i]), overlap[i], kind, named))
    ranked.sort(key=lambda r: (-r.score, r.sentence.passage, r.sentence.position))
    return ranked


def names_of(path: str) -> set[str]:
    """The words of a file's name that can name it in a question: "gpl" of gpl-3.txt, "dotenv" of
    python-dotenv.md (letters only, at least three)."""
    stem = Path(path).name.split(".")[0].lower()
    return {w for w in re.split(r"[^a-z]+", stem) if len(w) >= 3} - STOPWORDS - {"readme", "license", "txt", "doc", "docs"}


def keyword_overlap(question: str, texts: Sequence[str]) -> list[float]:
    """Per text, the IDF-weighted share of the question's content words it contains (0..1); IDF is
    taken over `texts`, so words every candidate shares count little."""
    terms = set(content_words(question))
    if not terms or not texts:
        return [0.0] * len(texts)
    bags = [set(content_words(t)) for t in texts]
    n = len(texts)
    idf = {t: math.log((n + 1) / (0.5 + sum(t in b for b in bags))) + 0.1 for t in terms}
    total = sum(idf.values())
    return [sum(idf[t] for t in terms if t in b) / total for b in bags]


# --- support ----------------------------------------------------------------------------------------


def key_terms(answer: str) -> set[str]:
    """What an answer must not invent: numbers, names (capitalised words not opening a sentence),
    quoted or `code` terms; lowercased."""
    terms = {m.group() for m in _NUMBER.finditer(answer)}
    terms |= {m.group(1) or m.group(2) for m in re.finditer(r"\"([^\"]{1,60})\"|`([^`]{1,60})`", answer)}
    words = answer.split()
    for i, w in enumerate(words):
        clean = w.strip(".,;:!?\"'()[]*")
        if clean[:1].isupper() and i > 0 and not words[i - 1].endswith((".", ":", "!", "?")) \
                and clean.lower() not in STOPWORDS and not re.fullmatch(r"\[\d+\]", w):
            terms.add(clean)
    return {t.lower() for t in terms if t.strip()}


def supported(answer: str, evidence: Sequence[str], question: str = "", min_share: float = 0.75) -> bool:
    """True when every key term of `answer` occurs in `evidence`, and so do at least `min_share` of its
    content words that the question does not already hold (and there is at least one such word: an
    answer that only restates the question says nothing)."""
    text = " ".join(" ".join(e.split()) for e in evidence).lower()
    if not answer.strip() or not text:
        return False
    if any(t not in text for t in key_terms(answer)):
        return False
    evidence_words = set(content_words(text))
    new = new_words(answer, question)
    return bool(new) and sum(w in evidence_words for w in new) >= min_share * len(new)


def new_words(answer: str, question: str) -> set[str]:
    """The content words (stemmed) of `answer` that `question` does not already hold: what it adds."""
    return set(content_words(answer)) - set(content_words(question))
