"""Summaries of texts of any length: one call when the text fits, map-reduce when it does not.

`summarize(llm, text, words=150, style="paragraph" | "bullets") -> Summary` (a str).

- A text that fits one prompt (the model's context, less the prompt and the answer, and at most
  `chunk_tokens`) is summarized in one call.
- A longer text is split on its structure (Markdown headings, paragraphs, list items; sentences,
  then words, only inside a paragraph too long for a chunk; see `split_chunks`) into chunks that fit
  the budget. Each chunk is summarized (map); the summaries, in document order, are combined into
  the final summary (reduce). When the summaries together are still too long for one prompt, they
  are chunked and combined again, level by level, until they fit (`Summary.levels` counts the chunks
  of each level). A progress bar on stderr counts chunks.
- Every prompt tells the model to use only what the text in front of it states and to add no facts,
  names or numbers; the reduce step sees only the chunk summaries. A model can still get things
  wrong: a summary is a reading aid, not a source.
- Length: the answer's token budget follows `words`, and the text is trimmed at a sentence (or, for
  bullets, an item) boundary when the model overshoots by more than a fifth. Style: "bullets" always
  comes back as "- " lines, "paragraph" as one paragraph, whatever the model wrote.
- Decoding is greedy by default, with the repetition loop guard; any generation control
  (`temperature`, `num_beams`, `repetition_penalty`, ...) may be passed and wins.
- A model without a chat template (a base model, like Gemma 3 270M) gets the same instructions as
  plain text ending in "Summary:" (or "Key points:\n- "), and its answer ends at the first blank line.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from llmos.errors import LlmosError
from llmos.generation import complete
from llmos.tasks import faithful, ingest
from llmos.tasks.textfiles import require_text

if TYPE_CHECKING:
    from llmos.tasks.chat_model import ChatModel

STYLES = ("paragraph", "bullets")
# Chunks stay this small even when the context is larger: a small model keeps track of a 2k-token
# passage far better than of 8k, and the map step then reads each part closely.
DEFAULT_CHUNK_TOKENS = 2048
MIN_CHUNK_TOKENS = 32
MARGIN = 8  # tokens: a prompt's tokens are not exactly the sum of its pieces'
MAX_LEVELS = 8
# Greedy, with the loop guard. No repetition_penalty: it counts the prompt too, so it pushes the model
# away from the text's own words; on the shipped set 1.1 took ROUGE-1 from 40.7 to 22.5 (8 items)
# and brought in facts the text does not state.
DEFAULTS: dict[str, Any] = {"temperature": 0, "repetition_guard": True}

SYSTEM = ("You write faithful summaries. Use only facts stated in the text you are given. Never add facts, "
          "names, numbers, dates or opinions that are not in it.")
PROMPTS = {
    # map: one part of a longer document
    "part": "Summarize this part of a longer document in at most {words} words. Keep its key facts, names and "
            "numbers. Write only the summary.\n\nText:\n{text}",
    # later levels: summaries of consecutive parts, to be merged
    "combine": "Below are summaries of consecutive parts of one document. Merge them into one summary of at most "
               "{words} words, using only what they state. Write only the summary.\n\nSummaries:\n{text}",
    "paragraph": "Summarize the text below in one paragraph of at most {words} words. Write only the summary."
                 "\n\nText:\n{text}",
    "bullets": "Summarize the text below as a list of key points, one per line, each starting with \"- \", at "
               "most {words} words in all. Write only the list.\n\nText:\n{text}",
    "final-paragraph": "Below are summaries of consecutive parts of one document. Write one summary of the whole "
                       "document as one paragraph of at most {words} words, using only what they state. Write "
                       "only the summary.\n\nSummaries:\n{text}",
    "final-bullets": "Below are summaries of consecutive parts of one document. Write the key points of the whole "
                     "document as a list, one per line, each starting with \"- \", at most {words} words in all, "
                     "using only what they state. Write only the list.\n\nSummaries:\n{text}",
}


class Summary(str):
    """The summary text, with how it was made.

    `levels`: chunks summarized at each map level, () when the text went through one call;
    `calls`: generation calls; `input_tokens`: tokens of the text; `generated_tokens`: tokens the
    model generated in all calls; `max_prompt_tokens`: the longest prompt sent; with the check on,
    `written`: sentences the model wrote for the final summary, `replaced`: sentences (of all calls)
    dropped as unsupported or repeated, `added`: source sentences put in their place."""

    written: int = 0
    replaced: int = 0
    added: int = 0
    levels: tuple[int, ...]
    calls: int
    input_tokens: int
    generated_tokens: int
    max_prompt_tokens: int

    def __new__(cls, text: str, **stats: Any) -> Summary:
        self = super().__new__(cls, text)
        for key, value in stats.items():
            setattr(self, key, value)
        return self


def summarize(llm: ChatModel, text: str, *, words: int = 150, style: str = "paragraph", progress: bool = True,
              chunk_tokens: int | None = None, check: bool = True, embedder: Any = None, **controls: Any) -> Summary:
    """Summarize `text` in about `words` words as a paragraph or bullets (see the module docstring).

    `chunk_tokens` caps a chunk (default 2048, or less where the context is smaller); `controls` are
    generation controls (greedy with the repetition guard unless given). `check` (default on) checks
    every summary sentence against the text and replaces unsupported or repeated ones with the text's
    most central sentences (`llmos.tasks.faithful`), with `embedder` (default: the default embedding
    model)."""
    if isinstance(words, bool) or not isinstance(words, int) or not 5 <= words <= 5000:
        raise LlmosError(f"words must be an integer in [5, 5000], got {words!r}")
    if style not in STYLES:
        raise LlmosError(f"style must be one of {', '.join(STYLES)}, got {style!r}")
    require_text(text if isinstance(text, str) else "", "the text to summarize")
    run = _Run(llm, {**DEFAULTS, **controls}, progress)
    checker = _Checker(embedder) if check else None
    text = text.strip()
    ctx = llm.config.max_seq_len
    cap = chunk_tokens or DEFAULT_CHUNK_TOKENS
    final_new = run.new_tokens(words)
    input_tokens = run.count(text)

    # Short input: one call.
    if input_tokens <= min(cap, run.room(style, final_new)):
        summary = run.call(style, text, words, final_new)
        if checker:
            checker.sources.append(checker.source(text))
        return _result(summary, style, words, run, (), input_tokens, checker)

    map_words = min(max(words, 60), 150)
    map_new = min(run.new_tokens(map_words), max(16, (ctx - run.overhead("part") - MARGIN) // 4))
    levels: list[int] = []
    level_text, level_tokens, kind = text, input_tokens, "part"
    while True:
        budget = min(cap, run.room(kind, map_new))
        if budget < MIN_CHUNK_TOKENS:
            raise LlmosError(f"the model's context ({ctx} tokens) is too small to summarize in parts: "
                             f"a part would get {budget} tokens; use a model with a longer context")
        chunks = split_chunks(level_text, run.count, budget)
        bar = tqdm(chunks, desc=f"summarizing (level {len(levels) + 1})", unit="chunk", disable=not progress,
                   file=sys.stderr, leave=False)
        summaries = [_checked_part(run.call(kind, chunk, map_words, map_new), chunk, map_words, checker, kind == "part")
                     for chunk in bar]
        bar.close()
        levels.append(len(chunks))
        joined = "\n\n".join(s for s in summaries if s)
        if not joined:
            raise LlmosError("the model wrote no summary for any part of the text")
        joined_tokens = run.count(joined)
        if joined_tokens <= min(cap, run.room(f"final-{style}", final_new)):
            break
        if len(levels) >= MAX_LEVELS or joined_tokens >= level_tokens:
            raise LlmosError(f"the summaries of the parts do not get shorter ({joined_tokens} tokens after "
                             f"{len(levels)} levels): try fewer --words or another model")
        level_text, level_tokens, kind = joined, joined_tokens, "combine"
    summary = run.call(f"final-{style}", joined, words, final_new)
    return _result(summary, style, words, run, tuple(levels), input_tokens, checker)


class _Run:
    """Prompts, token budgets and call statistics for one summarize() call."""

    def __init__(self, llm: ChatModel, controls: dict[str, Any], progress: bool) -> None:
        self.llm, self.progress = llm, progress
        self.max_new = controls.pop("max_new_tokens", None)  # the caller's cap on every call
        self.controls = controls
        self.calls = self.generated = self.max_prompt = 0
        self._overhead: dict[str, int] = {}
        self.plain = llm.tokenizer.chat_template is None  # a base model: plain prompts (see the module docstring)

    def count(self, text: str) -> int:
        return len(self.llm.encode(text, add_special_tokens=False))

    def messages(self, kind: str, text: str, words: int) -> list[dict[str, str]]:
        return [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": PROMPTS[kind].format(words=words, text=text)}]

    def overhead(self, kind: str) -> int:
        """Prompt tokens besides the text (with a 4-digit word count, the longest we write)."""
        if kind not in self._overhead:
            self._overhead[kind] = len(self.ids(kind, "", 1000))
        return self._overhead[kind]

    def room(self, kind: str, new_tokens: int) -> int:
        """Tokens of text that fit a `kind` prompt with `new_tokens` left for the answer."""
        return self.llm.config.max_seq_len - self.overhead(kind) - new_tokens - MARGIN

    def new_tokens(self, words: int) -> int:
        # ~1.3 tokens per English word, plus room for list markup; never more than a quarter of
        # the context, so the text always keeps most of it.
        tokens = int(words * 1.6) + 24
        if self.max_new is not None:
            tokens = min(tokens, self.max_new)
        return max(8, min(tokens, self.llm.config.max_seq_len // 4))

    def ids(self, kind: str, text: str, words: int) -> list[int]:
        if not self.plain:
            return self.llm.chat_ids(self.messages(kind, text, words))
        cue = "\n\nKey points:\n- " if kind.endswith("bullets") else "\n\nSummary:"
        return self.llm.tokenizer.text_ids(f"{SYSTEM}\n\n{PROMPTS[kind].format(words=words, text=text)}{cue}")

    def call(self, kind: str, text: str, words: int, new_tokens: int) -> str:
        if self.plain:
            controls = {"stop": ["\n\n"], **self.controls, "max_new_tokens": new_tokens}
            out = complete(self.llm.start(self.ids(kind, text, words), controls))
            self.max_prompt = max(self.max_prompt, out.prompt_tokens)
            self.calls += 1
            self.generated += out.completion_tokens
            return ("- " if kind.endswith("bullets") else "") + str(out)
        out = self.llm.chat(self.messages(kind, text, words), **self.controls, max_new_tokens=new_tokens)
        self.max_prompt = max(self.max_prompt, out.prompt_tokens)  # the chat call tokenized it already
        self.calls += 1
        self.generated += out.completion_tokens
        return str(out)


def _result(text: str, style: str, words: int, run: _Run, levels: tuple[int, ...], input_tokens: int,
            checker: _Checker | None) -> Summary:
    text = tidy(text, style, words)
    stats: dict[str, int] = {}
    if checker is not None:
        checked = faithful.check(faithful.split_units(text), faithful.SourceSentences.join(checker.sources),
                                 checker.embedder, words)
        text = tidy(_joined(checked.units, style), style, words)
        stats = {"written": checked.written, "replaced": checker.replaced + checked.replaced,
                 "added": checker.added + checked.added}
    return Summary(text, levels=levels, calls=run.calls, input_tokens=input_tokens,
                   generated_tokens=run.generated, max_prompt_tokens=run.max_prompt, **stats)


class _Checker:
    """Checks summaries against their sources (`llmos.tasks.faithful`); keeps the sources of the
    first level (the document's own text) for the final check, and counts what it replaced."""

    def __init__(self, embedder: Any) -> None:
        if embedder is None:
            from llmos.tasks.embed import Embedder

            embedder = Embedder.load()
        self.embedder = embedder
        self.sources: list[faithful.SourceSentences] = []
        self.replaced = self.added = 0

    def source(self, text: str) -> faithful.SourceSentences:
        return faithful.SourceSentences.of(text, self.embedder)


def _checked_part(summary: str, chunk: str, words: int, checker: _Checker | None, first_level: bool) -> str:
    """A part's summary with unsupported or repeated sentences replaced from the part itself."""
    summary = tidy(summary, "paragraph", words * 2)
    if checker is None:
        return summary
    source = checker.source(chunk)
    if first_level:
        checker.sources.append(source)
    checked = faithful.check(faithful.split_units(summary), source, checker.embedder, words, replace_only=True)
    checker.replaced += checked.replaced
    checker.added += checked.added
    return _joined(checked.units, "paragraph")


def _joined(units: list[str], style: str) -> str:
    return "\n".join(f"- {u}" for u in units) if style == "bullets" else " ".join(units)


# --- splitting ------------------------------------------------------------------------------------


def split_chunks(text: str, count_tokens: Callable[[str], int], max_tokens: int) -> list[str]:
    """`text` cut on its structure into chunks of at most `max_tokens` tokens, in order.

    Ingestion's Markdown reader finds the blocks (paragraphs, list items, code blocks, with their
    heading path) and packs blocks under one heading; chunks then also merge across headings, each
    heading path written once as a `## A > B` line where it starts."""
    if max_tokens < MIN_CHUNK_TOKENS:
        raise LlmosError(f"chunks need at least {MIN_CHUNK_TOKENS} tokens, got {max_tokens}")
    document = ingest.Document(Path("<text>"), "markdown", text, ingest.split_lines(text, "markdown"))
    # Ingestion counts "A > B\n" + text; a chunk here writes "## A > B\n\n" + text: leave room for it.
    pieces = ingest.chunk(document, count_tokens, max_tokens - MARGIN).chunks
    chunks: list[str] = []
    current = ""
    heading: tuple[str, ...] | None = None
    for piece in pieces:
        part = piece.text.strip()
        if piece.heading != heading:
            heading = piece.heading
            if heading:
                part = f"## {' > '.join(heading)}\n\n{part}"
        candidate = f"{current}\n\n{part}" if current else part
        if current and count_tokens(candidate) > max_tokens:
            chunks.append(current)
            if piece.heading and not part.startswith("## "):  # a new chunk restates where it is
                part = f"## {' > '.join(piece.heading)}\n\n{part}"
            candidate = part
        current = candidate
    if current:
        chunks.append(current)
    return chunks


# --- shaping the answer -------------------------------------------------------------------------------

_PREAMBLE = re.compile(r"^\s*(?:(?:here is|here's|sure|certainly|okay)\b[^\n]*?:|(?:the )?(?:summary|key points)\s*:)\s*",
                       re.I)
_MARKER = re.compile(r"^\s*(?:[-*+\u2022\u2013]|\d+[.)])\s+")
_SENTENCE = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")


def tidy(text: str, style: str, words: int) -> str:
    """The model's answer in the asked style, without preambles, trimmed near the word limit."""
    text = _PREAMBLE.sub("", text.strip(), count=1).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if style == "bullets":
        if len(lines) == 1 and not _MARKER.match(lines[0]):
            lines = [s for s in _SENTENCE.split(lines[0]) if s.strip()]
        items = _unique([_MARKER.sub("", line).strip() for line in lines])
        return "\n".join("- " + item for item in _trim(items, words) if item)
    paragraph = " ".join(_MARKER.sub("", line) for line in lines)
    sentences = _unique([s for s in _SENTENCE.split(paragraph) if s.strip()])
    if len(sentences) > 1 and not re.search(r"[.!?\u2026][\"')\]]*$", sentences[-1]):
        sentences.pop()  # cut off by the token budget or the loop guard
    return " ".join(_trim(sentences, words))


def _unique(units: list[str]) -> list[str]:
    """Units without repeats: a small model caught in a loop says the same sentence again."""
    seen: set[str] = set()
    out = []
    for unit in units:
        key = " ".join(unit.casefold().split())
        if key not in seen:
            seen.add(key)
            out.append(unit)
    return out


def _trim(units: list[str], words: int) -> list[str]:
    """Whole units (sentences or items) up to the word limit, when the text is over it by a fifth."""
    total = sum(len(u.split()) for u in units)
    if total <= words * 1.2:
        return units
    kept: list[str] = []
    used = 0
    for unit in units:
        n = len(unit.split())
        if kept and used + n > words:
            break
        if not kept and n > words * 1.2:  # one unit alone is too long: cut it at the limit
            return [" ".join(unit.split()[:words]) + "\u2026"]
        kept.append(unit)
        used += n
    return kept
