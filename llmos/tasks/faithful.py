"""Faithful summaries: check a model's summary sentence by sentence against its source, and the
extractive summaries used to repair it and as baselines.

    source = SourceSentences.of(text, embedder)             # the source split and embedded once
    checked = check(summary_units, source, embedder, words)  # .text, .replaced, .repeated
    lead(text, 3); centroid(source, words)                  # the extractive baselines

A summary unit (a sentence, or a bullet) stays when every number, name and quoted term it has occurs
in the source (`evidence.key_terms`), so do three quarters of its content words, its embedding is close to some source sentence (cosine at least
`min_similarity`), and it is not a near-repeat of a unit already kept (cosine under `max_overlap`).
Units that fail are dropped, and a summary short of its word budget (FILL of it) is filled with the
source's most central sentences (cosine with the centroid of all source sentences, redundant ones skipped),
quoted as the source has them: nothing in a checked summary is unsupported.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from llmos.tasks import evidence

MIN_SIMILARITY = 0.55  # a unit this close to some source sentence says something the source says
MAX_OVERLAP = 0.85  # two units this close say the same thing
MIN_WORD_SHARE = 0.75  # of a unit's content words, at least this share must occur in the source
MIN_UNIT_WORDS = 4
FILL = 1.0  # a summary short of its word budget is filled with central sentences...
OVERSHOOT = 1.2  # ...each one fitting within this share of it (as `summarize.tidy` allows)


@dataclass(frozen=True)
class SourceSentences:
    """A source text's sentences and their unit embeddings (rows of `vectors`)."""

    sentences: list[str]
    vectors: np.ndarray  # (N, D), unit rows
    text: str  # the source, whitespace folded and lowercased, for term look-ups

    @functools.cached_property
    def words(self) -> frozenset[str]:
        """The source's content words (stemmed), for the word-share check."""
        return frozenset(evidence.content_words(self.text))

    @classmethod
    def of(cls, text: str, embedder: Any) -> SourceSentences:
        sentences = split_units(text)
        return cls(sentences, _embed(embedder, sentences), " ".join(text.split()).lower())

    @classmethod
    def join(cls, parts: Sequence[SourceSentences]) -> SourceSentences:
        """Several sources as one (the chunks of a long document)."""
        dim = next((p.vectors.shape[1] for p in parts if p.vectors.size), 0)
        vectors = np.concatenate([p.vectors for p in parts if p.vectors.size]) if dim else np.zeros((0, 0), np.float32)
        return cls([s for p in parts for s in p.sentences], vectors, " ".join(p.text for p in parts))


@dataclass(frozen=True)
class Checked:
    """A checked summary: its units, and how many the model wrote, were dropped or were added."""

    units: list[str]
    written: int  # units the model wrote
    unsupported: int  # dropped: a term not in the source, or no source sentence close enough
    repeated: int  # dropped: a near-repeat of a unit kept before
    added: int  # central source sentences added in their place

    @property
    def replaced(self) -> int:
        return self.unsupported + self.repeated


def split_units(text: str) -> list[str]:
    """Sentences and list items of `text`, whitespace folded, Markdown markers and headings dropped."""
    units = []
    for s, e in evidence.split_sentences(text):
        unit = " ".join(text[s:e].split())
        unit = evidence.LIST_MARKER.sub("", unit).strip()
        if unit.startswith("#"):
            unit = unit.lstrip("#").strip()
            if len(unit.split()) < 6:  # a heading alone says nothing a summary needs
                continue
        if len(unit.split()) >= MIN_UNIT_WORDS:  # shorter: a heading or label, not a statement
            units.append(unit)
    return units


def check(units: Sequence[str], source: SourceSentences, embedder: Any, words: int, *, replace_only: bool = False,
          min_similarity: float = MIN_SIMILARITY, max_overlap: float = MAX_OVERLAP) -> Checked:
    """`units` (the model's sentences or bullets) with unsupported and repeated ones replaced (see the module doc).

    `replace_only`: fill no further than the words the model wrote (the parts of a long document, whose
    summaries must stay shorter than the parts)."""
    vectors = _embed(embedder, list(units))
    kept: list[int] = []
    unsupported = repeated = 0
    for i, unit in enumerate(units):
        said = evidence.content_words(unit)
        terms_ok = all(t in source.text for t in evidence.key_terms(unit)) and \
            sum(w in source.words for w in said) >= MIN_WORD_SHARE * len(said)
        close = source.vectors.size and float((source.vectors @ vectors[i]).max()) >= min_similarity
        if not (terms_ok and close):
            unsupported += 1
        elif kept and float((vectors[kept] @ vectors[i]).max()) >= max_overlap:
            repeated += 1
        else:
            kept.append(i)
    out = [units[i] for i in kept]
    added = 0
    used = sum(len(u.split()) for u in out)
    target = min(FILL * words, sum(len(u.split()) for u in units)) if replace_only else FILL * words
    have = vectors[kept] if kept else np.zeros((0, source.vectors.shape[1] if source.vectors.size else 1), np.float32)
    for j in central(source, max_overlap=max_overlap, exclude=have):
        n = len(source.sentences[j].split())
        if used >= target:
            break
        if out and used + n > OVERSHOOT * words:
            continue  # a shorter one may still fit
        out.append(source.sentences[j])
        have = np.concatenate([have, source.vectors[j:j + 1]]) if have.size else source.vectors[j:j + 1]
        used += n
        added += 1
    return Checked(out, len(units), unsupported, repeated, added)


def central(source: SourceSentences, *, max_overlap: float = MAX_OVERLAP, exclude: np.ndarray | None = None) -> list[int]:
    """Indices of source sentences, most central first (cosine with the centroid), skipping any within
    `max_overlap` of one taken before or of a row of `exclude`."""
    if not source.sentences:
        return []
    centroid = source.vectors.mean(axis=0)
    centroid /= np.linalg.norm(centroid) or 1.0
    order = np.argsort(-(source.vectors @ centroid), kind="stable")
    taken = exclude if exclude is not None and exclude.size else np.zeros((0, source.vectors.shape[1]), np.float32)
    out = []
    for j in order:
        v = source.vectors[j]
        if taken.shape[0] and float((taken @ v).max()) >= max_overlap:
            continue
        out.append(int(j))
        taken = np.concatenate([taken, v[None]])
    return out


def centroid(source: SourceSentences, words: int) -> str:
    """The centroid baseline: the most central, non-redundant sentences up to `words`, in source order."""
    chosen, used = [], 0
    for j in central(source):
        n = len(source.sentences[j].split())
        if chosen and used + n > words:
            break
        chosen.append(j)
        used += n
    return " ".join(source.sentences[j] for j in sorted(chosen))


def lead(text: str, sentences: int = 3) -> str:
    """The lead baseline: the first `sentences` sentences."""
    return " ".join(split_units(text)[:sentences])


def _embed(embedder: Any, texts: list[str]) -> np.ndarray:
    if not texts:
        return np.zeros((0, 0), np.float32)
    return np.asarray(embedder.embed(texts).vectors, dtype=np.float32)
