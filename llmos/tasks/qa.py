"""Grounded question answering over an index: retrieve, pick sentences, answer, check, cite.

    answer = ask(llm, "How do I rotate the API key?", index=Index("notes.sqlite"))
    print(answer)                       # "Run acmectl keys rotate. [1]"
    for s in answer.cited: print(s.number, s.location, s.quote)

A small chat model does not read four passages well: it loops, copies the wrong number, and never
declines. So the model is one step of a pipeline that carries it:

1. Retrieve the `k` best passages (hybrid search by default) whose cosine similarity with the question
   is at least `min_similarity` (keyword-only results always pass).
2. Split them into sentences with their file, line range and heading path (`evidence.sentences_of`).
3. Rank the sentences for the question (`evidence.rank`: embedding similarity, keyword overlap,
   whether a sentence holds what the question asks for, the passage's rank).
4. Decline when the best sentence scores under `min_support` (tuned on the shipped development sets):
   the answer says the indexed documents do not say, `found` is False, and `nearest` holds the closest
   sentences. The chat model is not called, so it cannot invent an answer.
5. The model writes a short answer (greedy, `max_new_tokens` 64, stopped at a blank line, with the
   loop guard) from the `evidence` best sentences only, not whole passages.
6. Check it (`evidence.supported`): every number, name and quoted term of the answer must occur in the
   evidence sentences. An answer that fails, declines, runs into a loop, or adds more than
   `MAX_ANSWER_WORDS` content words to the question's is replaced by the best sentence itself, quoted
   (`extractive` is True). The length rule is measured: the model's short answers are spans of the
   evidence, its long ones rewrites that splice the question's words onto another sentence's facts
   (`llmos eval qa`, four shipped sets, 230 questions: 166 right with it, 160 without, 163 quoting
   the best sentence always; the held-out set, never tuned on: 44, 43 and 43 of 60).
7. Cite: the pipeline attaches `[n]` for the sentence(s) the answer stands on (the model's own `[n]`
   are removed, never trusted). `sources` are the evidence sentences, numbered; `cited` those used.

`index=None` is plain chat question answering (short, guarded, no sources). `stream=True` returns an
`AnswerStream`: `.sources` is known at once; the text comes after the check, so only checked text is
ever shown. Generation is greedy unless `controls` say otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmos.errors import LlmosError
from llmos.tasks import evidence
from llmos.tasks.evidence import Ranked, Sentence

if TYPE_CHECKING:
    from llmos.tasks.chat_model import ChatModel
    from llmos.tasks.index import Index

NOTHING_FOUND = "I found nothing relevant to this question in the indexed documents, so I cannot answer it from them."
NOT_STATED = "The indexed documents do not say. The closest passages are listed below."
DEFAULT_MIN_SIMILARITY = 0.25
DEFAULT_MIN_SUPPORT = 0.65  # the best sentence's rank score: no answerable question of the development sets fell under it
DEFAULT_K = 6
DEFAULT_EVIDENCE = 3
DEFAULT_MAX_NEW_TOKENS = 64
MAX_ANSWER_WORDS = 4  # content words a model answer may add to the question's and still be shown (step 6)
SYSTEM_PROMPT = (
    "You answer a question from the given text. Reply with the answer only, as a short phrase or one "
    "sentence, using the words of the text. If the text does not contain the answer, reply: Not stated."
)
_DECLINE = re.compile(r"\b(not stated|not mentioned|does not (say|mention|contain|specify|state)|do not know|"
                      r"don't know|no information|cannot (answer|determine)|not (provided|specified|given))\b", re.I)


@dataclass(frozen=True)
class Source:
    """An evidence sentence given as source [number]: the sentence (`quote`) and where it is."""

    number: int
    path: str
    location: str  # path:lines, or path p.N
    heading: tuple[str, ...]
    quote: str
    line_start: int
    line_end: int
    page: int | None
    score: float

    @classmethod
    def from_sentence(cls, number: int, r: Ranked) -> Source:
        s = r.sentence
        return cls(number, s.path, s.location, s.heading, s.text, s.line_start, s.line_end, s.page, r.score)

    def as_dict(self) -> dict[str, Any]:
        return {"number": self.number, "path": self.path, "location": self.location, "heading": list(self.heading),
                "quote": self.quote, "line_start": self.line_start, "line_end": self.line_end, "page": self.page,
                "score": round(self.score, 4)}


class Answer(str):
    """The answer text, with `sources` (the evidence, numbered), `cited` (what the answer stands on),
    `found` (False when declined), `extractive` (the answer is a quoted sentence), `nearest` (the
    closest sentences, also when declined), `model_answer` (what the model wrote, before the check)
    and `finish_reason`."""

    sources: list[Source]
    cited: list[Source]
    nearest: list[Source]
    found: bool
    extractive: bool
    model_answer: str | None
    finish_reason: str | None

    def __new__(cls, text: str, sources: list[Source] | None = None, *, cited: list[Source] | None = None,
                nearest: list[Source] | None = None, found: bool = True, extractive: bool = False,
                model_answer: str | None = None, finish_reason: str | None = None) -> Answer:
        self = super().__new__(cls, text)
        self.sources, self.cited, self.nearest = sources or [], cited or [], nearest or []
        self.found, self.extractive, self.model_answer, self.finish_reason = found, extractive, model_answer, finish_reason
        return self

    def as_dict(self) -> dict[str, Any]:
        return {"answer": str(self), "found": self.found, "extractive": self.extractive,
                "model_answer": self.model_answer, "cited": [s.as_dict() for s in self.cited],
                "sources": [s.as_dict() for s in self.sources], "nearest": [s.as_dict() for s in self.nearest]}


class AnswerStream:
    """The answer's text pieces; `.sources` now, `.answer` (the full `Answer`) after the last piece.
    The text is checked before any of it is yielded."""

    def __init__(self, make: Any, sources: list[Source], found: bool) -> None:
        self.sources, self.found = sources, found
        self.answer: Answer | None = None
        self._make = make

    def __iter__(self) -> Iterator[str]:
        self.answer = self._make()
        yield str(self.answer)


def ask(
    llm: ChatModel,
    question: str,
    index: Index | None = None,
    *,
    k: int = DEFAULT_K,
    mode: str = "hybrid",
    stream: bool = False,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    min_similarity: float = DEFAULT_MIN_SIMILARITY,
    min_support: float = DEFAULT_MIN_SUPPORT,
    evidence_sentences: int = DEFAULT_EVIDENCE,
    generate: bool = True,
    **controls: Any,
) -> Answer | AnswerStream:
    """Answer `question` from `index` (or, with no index, from the model alone); see the module doc.

    `generate=False` answers with the best sentence alone (no chat model needed)."""
    controls = {**ANSWER_CONTROLS, **controls}
    if index is None:
        _check_question(question)
        return _plain(llm, question, stream, max_new_tokens, controls)
    found = gather(question, index, k=k, mode=mode, min_similarity=min_similarity, min_support=min_support,
                   evidence_sentences=evidence_sentences)
    if found.declined is not None:
        return AnswerStream(lambda: found.declined, [], False) if stream else found.declined

    def make() -> Answer:
        if not generate or llm is None:
            return found.quoted()
        reply = llm.chat(found.messages(), max_new_tokens=max_new_tokens, **controls)
        return found.conclude(str(reply), getattr(reply, "finish_reason", None))

    return AnswerStream(make, found.sources, True) if stream else make()


# Greedy, short, stopped at a blank line, with the loop guard (callers may override any of them).
ANSWER_CONTROLS: dict[str, Any] = {"temperature": 0.0, "repetition_guard": True, "stop": ["\n\n"]}


def _check_question(question: Any) -> None:
    if not isinstance(question, str) or not question.strip():
        raise LlmosError("the question is empty")


@dataclass(frozen=True)
class Evidence:
    """Steps 1-4 done for a question: the evidence sentences and their numbered sources, or the
    declined answer. `messages()` is the prompt for step 5; `conclude(reply)` does steps 6-7. A server
    runs the model between the two on its own worker."""

    question: str
    ranked: list[Ranked]  # the evidence sentences, best first
    sources: list[Source]  # the same, numbered
    declined: Answer | None

    def messages(self) -> list[dict[str, str]]:
        return build_messages(self.question, [r.sentence for r in self.ranked])

    def quoted(self, model_answer: str | None = None, finish_reason: str | None = None) -> Answer:
        """The best sentence itself, quoted and cited."""
        best = self.sources[0]
        return Answer(f"\u201c{best.quote}\u201d [1]", self.sources, cited=[best], nearest=self.sources,
                      extractive=True, model_answer=model_answer, finish_reason=finish_reason)

    def conclude(self, reply: str, finish_reason: str | None = None) -> Answer:
        """Steps 6-7: the model's reply checked against the evidence and cited, or the quoted sentence."""
        text = clean(reply)
        if finish_reason in ("length", "repetition") or not text or _DECLINE.search(text) \
                or len(evidence.new_words(text, self.question)) > MAX_ANSWER_WORDS \
                or not evidence.supported(text, [s.quote for s in self.sources], self.question):
            return self.quoted(text, finish_reason)
        used = _standing_on(text, self.sources, self.question)
        marks = "".join(f"[{s.number}]" for s in used)
        return Answer(f"{text} {marks}", self.sources, cited=used, nearest=self.sources, model_answer=text,
                      finish_reason=finish_reason)


def gather(question: str, index: Index, *, k: int = DEFAULT_K, mode: str = "hybrid",
           min_similarity: float = DEFAULT_MIN_SIMILARITY, min_support: float = DEFAULT_MIN_SUPPORT,
           evidence_sentences: int = DEFAULT_EVIDENCE) -> Evidence:
    """Steps 1-4: retrieve, split, rank, and decline when the best sentence scores under `min_support`."""
    _check_question(question)
    if evidence_sentences < 1:
        raise LlmosError(f"evidence_sentences must be at least 1, got {evidence_sentences}")
    results = index.search(question, k=k, mode=mode)
    relevant = [r for r in results if r.similarity is None or r.similarity >= min_similarity]
    # With no relevant passage, the nearest ones still show the user what the documents hold.
    ranked = rank_sentences(question, relevant or results, index)[:evidence_sentences]
    sources = [Source.from_sentence(i + 1, r) for i, r in enumerate(ranked)]
    declined = None
    if not ranked:
        declined = Answer(NOTHING_FOUND, [], found=False)  # an empty index
    elif not relevant or ranked[0].score < min_support:
        declined = Answer(NOT_STATED, [], nearest=sources, found=False)
    return Evidence(question, ranked, sources, declined)


def rank_sentences(question: str, results: list[Any], index: Index) -> list[Ranked]:
    """Steps 2-3: the sentences of retrieved passages, best first."""
    sentences = [s for i, r in enumerate(results) for s in evidence.sentences_of(r, i)]
    return evidence.rank(question, sentences, index.embedder) if sentences else []


def build_messages(question: str, sentences: list[Sentence]) -> list[dict[str, str]]:
    """The chat: instructions, then the evidence sentences in document order and the question."""
    ordered = sorted(sentences, key=lambda s: (s.path, s.line_start, s.position))
    text = " ".join(s.text for s in ordered)
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": f"Text: {text}\n\nQuestion: {question}"}]


def clean(text: str) -> str:
    """The model's reply as an answer: its own [n] marks and an "Answer:" label removed, one paragraph."""
    text = re.sub(r"\s*\[\d+(?:\s*[,;]\s*\d+)*\]", "", text)
    text = re.sub(r"^\s*(?:the\s+)?answer(?: is)?\s*:\s*", "", text, flags=re.I)
    return " ".join(text.split()).strip()


def _standing_on(text: str, sources: list[Source], question: str = "") -> list[Source]:
    """The sources an answer stands on: the one sharing most of its key terms and content words (ties to
    the better ranked), then, greedily, others for key terms or words the answer adds to the question
    that those chosen lack (an answer drawing on two sentences cites both)."""
    terms = evidence.key_terms(text)
    new = set(evidence.content_words(text)) - set(evidence.content_words(question))

    def holds(s: Source) -> tuple[set[str], set[str]]:
        quote = s.quote.lower()
        return {t for t in terms if t in quote}, new & set(evidence.content_words(s.quote))

    def weight(s: Source, missing: tuple[set[str], set[str]]) -> tuple[int, int, int]:
        t, w = holds(s)
        return (len(t & missing[0]), len(w & missing[1]), -s.number)

    used: list[Source] = []
    missing = (set(terms), set(new))
    while len(used) < len(sources):
        best = max((s for s in sources if s not in used), key=lambda s: weight(s, missing))
        if used and weight(best, missing)[:2] == (0, 0):
            break
        used.append(best)
        t, w = holds(best)
        missing = (missing[0] - t, missing[1] - w)
    return sorted(used, key=lambda s: s.number)


def _plain(llm: ChatModel, question: str, stream: bool, max_new_tokens: int, controls: dict[str, Any]) -> Answer | AnswerStream:
    messages = [{"role": "user", "content": question}]
    if stream:
        run = llm.chat_stream(messages, max_new_tokens=max_new_tokens, **controls)
        return _PlainStream(run)
    reply = llm.chat(messages, max_new_tokens=max_new_tokens, **controls)
    return Answer(str(reply).strip(), finish_reason=getattr(reply, "finish_reason", None))


class _PlainStream(AnswerStream):
    """Plain chat answers stream as generated: there is no evidence to check them against."""

    def __init__(self, pieces: Iterator[str]) -> None:
        super().__init__(None, [], True)
        self._pieces = pieces

    def __iter__(self) -> Iterator[str]:
        text = []
        for piece in self._pieces:
            text.append(piece)
            yield piece
        self.answer = Answer("".join(text).strip())
