"""Question answering over an index, with citations: retrieve, pack, instruct, answer, cite.

    answer = ask(llm, "How do I rotate the API key?", index=Index("notes.sqlite"))
    print(answer)                       # the model's answer, citing passages as [1], [2] ...
    for s in answer.cited: print(s.number, s.location)

`ask` retrieves the `k` best passages (hybrid search by default), keeps those that are relevant (cosine
similarity with the question at least `min_similarity`; in keyword mode, any BM25 match), packs as
many as fit into the chat model's context after the question, the instructions and room for
`max_new_tokens`, best first, and numbers them. The model is told to answer only from them and to
cite them as [n]. The reply is an `Answer`: a str, with `.sources` (every passage the model saw),
`.cited` (those it cited) and `.found`.

- No relevant passage (an empty index, or nothing close enough): the answer says so and the model is
  not called, so it cannot invent one. `found` is False.
- `index=None`: plain chat question answering, no sources.
- A model that answers without any [n]: `.cited` falls back to the passages sharing the most words
  with the answer, and `.citations_inferred` is True; the text is left as the model wrote it.
- `stream=True` returns an `AnswerStream`: iterate it for text pieces; `.sources` is known before
  the first piece, `.answer` (the full `Answer`) after the last.

Generation is greedy (`temperature=0`) unless `controls` say otherwise: answers should follow the
sources, not sample around them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmos.errors import LlmosError

if TYPE_CHECKING:
    from llmos.api import LLM
    from llmos.tasks.index import Index, SearchResult

NOTHING_FOUND = "I found nothing relevant to this question in the indexed documents, so I cannot answer it from them."
DEFAULT_MIN_SIMILARITY = 0.25
SYSTEM_PROMPT = (
    "You answer questions using only the numbered sources given with the question. "
    "Cite every source you use by its number in square brackets, like [1]. "
    "If the sources do not contain the answer, say that you do not know."
)


@dataclass(frozen=True)
class Source:
    """A passage given to the model as source [number]."""

    number: int
    path: str
    location: str  # path:lines, or path p.N
    heading: tuple[str, ...]
    text: str
    line_start: int
    line_end: int
    page: int | None
    score: float
    similarity: float | None

    @classmethod
    def from_result(cls, number: int, r: SearchResult) -> Source:
        return cls(number, r.path, r.location, r.heading, r.text, r.line_start, r.line_end, r.page, r.score, r.similarity)


class Answer(str):
    """The answer text, with `sources`, `cited`, `found`, `citations_inferred` and `finish_reason`."""

    sources: list[Source]
    cited: list[Source]
    found: bool
    citations_inferred: bool
    finish_reason: str | None

    def __new__(cls, text: str, sources: list[Source], *, found: bool = True, finish_reason: str | None = None) -> Answer:
        self = super().__new__(cls, text)
        self.sources, self.found, self.finish_reason = sources, found, finish_reason
        self.cited, self.citations_inferred = cite(text, sources)
        return self


class AnswerStream:
    """Text pieces of an answer as they are generated; `.sources` now, `.answer` at the end."""

    def __init__(self, pieces: Iterator[str], sources: list[Source], found: bool) -> None:
        self.sources, self.found = sources, found
        self.answer: Answer | None = None
        self._pieces = pieces

    def __iter__(self) -> Iterator[str]:
        text = []
        for piece in self._pieces:
            text.append(piece)
            yield piece
        self.answer = Answer("".join(text), self.sources, found=self.found)


def ask(
    llm: LLM,
    question: str,
    index: Index | None = None,
    *,
    k: int = 4,
    mode: str = "hybrid",
    stream: bool = False,
    max_new_tokens: int = 256,
    min_similarity: float = DEFAULT_MIN_SIMILARITY,
    context_tokens: int | None = None,
    **controls: Any,
) -> Answer | AnswerStream:
    """Answer `question` from `index` (or, with no index, from the model alone); see the module doc.

    `context_tokens` caps the prompt plus answer below the model's own context length.
    """
    if not isinstance(question, str) or not question.strip():
        raise LlmosError("the question is empty")
    controls.setdefault("temperature", 0.0)
    if index is None:
        messages = [{"role": "user", "content": question}]
        return _generate(llm, messages, [], stream, max_new_tokens, controls)
    results = [r for r in index.search(question, k=k, mode=mode) if _relevant(r, min_similarity)]
    if not results:
        if stream:
            return AnswerStream(iter([NOTHING_FOUND]), [], found=False)
        return Answer(NOTHING_FOUND, [], found=False)
    budget = min(llm.config.max_seq_len, context_tokens or llm.config.max_seq_len) - max_new_tokens
    sources = pack(llm, question, results, budget)
    return _generate(llm, build_messages(question, sources), sources, stream, max_new_tokens, controls)


def _relevant(result: SearchResult, min_similarity: float) -> bool:
    return result.similarity is None or result.similarity >= min_similarity


def build_messages(question: str, sources: list[Source]) -> list[dict[str, str]]:
    """The chat: instructions as the system turn, then the numbered sources and the question."""
    # Paths and line numbers stay out of the prompt: small models copy them into the answer.
    user = "Sources:\n\n" + "\n\n".join(format_source(s) for s in sources) + f"\n\nQuestion: {question}"
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def format_source(source: Source) -> str:
    heading = f"{' > '.join(source.heading)}: " if source.heading else ""
    return f"[{source.number}] {heading}{source.text.strip()}"


def pack(llm: LLM, question: str, results: list[SearchResult], budget: int) -> list[Source]:
    """Number and keep the best passages whose prompt fits in `budget` tokens (best first; a passage
    too long for what is left is skipped and shorter ones after it may still fit)."""

    def n_tokens(sources: list[Source]) -> int:
        return len(llm._chat_ids(build_messages(question, sources)))

    base = n_tokens([])
    if base >= budget:
        raise LlmosError(f"the question alone takes {base} tokens, more than the {budget} the chat model has for it")
    kept: list[Source] = []
    for r in results:  # exact counts of the whole prompt: k is small and tokenizing is fast
        candidate = Source.from_result(len(kept) + 1, r)
        if n_tokens([*kept, candidate]) <= budget:
            kept.append(candidate)
    if not kept:
        raise LlmosError(f"no retrieved passage fits in the {budget - base} tokens the chat model has left for sources")
    return kept


def _generate(llm: LLM, messages: list[dict[str, str]], sources: list[Source], stream: bool,
              max_new_tokens: int, controls: dict[str, Any]) -> Answer | AnswerStream:
    if stream:
        return AnswerStream(llm.chat_stream(messages, max_new_tokens=max_new_tokens, **controls), sources, found=True)
    reply = llm.chat(messages, max_new_tokens=max_new_tokens, **controls)
    return Answer(str(reply).strip(), sources, found=True, finish_reason=getattr(reply, "finish_reason", None))


_CITATION = re.compile(r"\[(\d+(?:\s*[,;]\s*\d+)*)\]")
_WORD = re.compile(r"\w+")


def cite(text: str, sources: list[Source]) -> tuple[list[Source], bool]:
    """The sources `text` cites as [n] (in order of first citation), and whether they were inferred:
    with no valid [n], the source sharing the most words with the text (if any share several)."""
    by_number = {s.number: s for s in sources}
    cited: dict[int, Source] = {}
    for group in _CITATION.findall(text):
        for number in re.split(r"\s*[,;]\s*", group):
            if int(number) in by_number:
                cited.setdefault(int(number), by_number[int(number)])
    if cited or not sources or not text.strip():
        return list(cited.values()), False
    words = {w for w in _WORD.findall(text.lower()) if len(w) > 2}
    overlaps = [(len(words & set(_WORD.findall(s.text.lower()))), -s.number, s) for s in sources]
    best, _, source = max(overlaps, key=lambda o: o[:2])
    if best >= min(3, len(words)) and best > 0:
        return [source], True
    return [], False
