"""Text generation above the engine: controls, stop strings, streaming, logprobs, results.

The engine yields token ids; this layer turns them into text the way users expect:

- `parse_controls` validates every keyword a caller may pass (transformers and OpenAI names), and
  refuses unknown ones, naming them. `response_format` (OpenAI's json_object / json_schema) becomes
  a logits mask the engine applies before its warpers (`llmos.json_constraint`).
- Prompts that do not fit the context fail with both numbers, unless a truncation side is asked for;
  the result then says what was cut.
- `TextGeneration` yields `Delta`s: UTF-8-safe text pieces per choice, with stop strings held back
  until they are ruled out (a stop string never leaks, streamed or not), and a finish reason on each
  choice's last delta: "eos" (the model's end token), "stop" (a stop string), "length",
  or "repetition" (the optional loop guard).
- `ChoiceState` is that text logic for one choice, fed one token at a time: `TextGeneration` runs it
  over the engine's `Generation`, the server over its batch engine's events (one implementation).
- `complete` gathers the same deltas into a `Completion`, so streamed and non-streamed text agree.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from llmos.engine.generate import Generation
from llmos.engine.sampling import LogitsMask, SamplingParams
from llmos.errors import ContextLengthError, LlmosError
from llmos.json_constraint import JsonFormat, parse_response_format
from llmos.models.kv_cache import KVCache
from llmos.tokenizer import Tokenizer

MAX_STOP_STRINGS = 16
MAX_LOGPROBS = 20  # alternatives reported per token
_SAMPLING = set(SamplingParams.__dataclass_fields__)
_OTHER = {
    "max_new_tokens", "max_length", "min_new_tokens", "stop", "seed", "n", "num_return_sequences",
    "logprobs", "top_logprobs", "truncate", "repetition_guard", "num_beams", "length_penalty",
    "early_stopping", "masks", "response_format",
}


@dataclass(frozen=True)
class Controls:
    params: SamplingParams = field(default_factory=SamplingParams)
    max_new_tokens: int | None = None
    max_length: int | None = None
    min_new_tokens: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    n: int = 1
    logprobs: int | None = None  # None: off; k >= 0: chosen token plus top k alternatives
    truncate: str | None = None  # None (fail), "left" or "right"
    repetition_guard: bool = False
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    masks: tuple[LogitsMask, ...] = ()  # the engine's hook: after the penalties, before the warpers
    response_format: JsonFormat | None = None  # constrained JSON output (a mask built per request)


def _int(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        allowed = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
        raise LlmosError(f"{name} must be {allowed}, got {value!r}", param=name.split(" ", 1)[0])
    return value


def parse_controls(controls: dict[str, Any], defaults: dict[str, Any] | None = None) -> Controls:
    """Validate generation keywords into Controls; unknown keywords are refused by name."""
    merged = {**(defaults or {}), **{k: v for k, v in controls.items() if v is not None}}
    unknown = sorted(set(merged) - _SAMPLING - _OTHER)
    if unknown:
        raise LlmosError(
            f"unknown generation argument(s): {', '.join(unknown)}; known: {', '.join(sorted(_SAMPLING | _OTHER))}"
        )
    params = SamplingParams(**{k: merged.pop(k) for k in list(merged) if k in _SAMPLING})
    n = merged.pop("n", merged.pop("num_return_sequences", 1))  # the alias is popped either way
    stop = merged.pop("stop", ())
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise LlmosError(f"stop must be a string or a list of strings, got {stop!r}", param="stop")
    if any(s == "" for s in stop):
        raise LlmosError("stop strings must not be empty", param="stop")
    if len(stop) > MAX_STOP_STRINGS:
        raise LlmosError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(stop)}", param="stop")
    logprobs = merged.pop("logprobs", None)
    top = merged.pop("top_logprobs", None)
    if logprobs is True or (logprobs is None and top is not None):
        logprobs = top or 0
    elif logprobs is False:
        logprobs = None
    if logprobs is not None:
        logprobs = _int("logprobs", logprobs, 0, MAX_LOGPROBS)
    truncate = merged.pop("truncate", None)
    if truncate not in (None, "left", "right"):
        raise LlmosError(f"truncate must be 'left', 'right' or None, got {truncate!r}", param="truncate")
    early = merged.pop("early_stopping", False)
    if early not in (True, False, "never"):
        raise LlmosError(f"early_stopping must be True, False or 'never', got {early!r}", param="early_stopping")
    length_penalty = merged.pop("length_penalty", 1.0)
    if not isinstance(length_penalty, (int, float)) or not math.isfinite(length_penalty):
        raise LlmosError(f"length_penalty must be a finite number, got {length_penalty!r}", param="length_penalty")
    c = Controls(
        params=params,
        max_new_tokens=None if merged.get("max_new_tokens") is None else _int("max_new_tokens", merged["max_new_tokens"], 0),
        max_length=None if merged.get("max_length") is None else _int("max_length", merged["max_length"], 1),
        min_new_tokens=_int("min_new_tokens", merged.get("min_new_tokens", 0), 0),
        stop=tuple(stop),
        seed=None if merged.get("seed") is None else _int("seed", merged["seed"], 0),
        n=_int("n (num_return_sequences)", n, 1, 128),
        logprobs=logprobs,
        truncate=truncate,
        repetition_guard=bool(merged.get("repetition_guard", False)),
        num_beams=_int("num_beams", merged.get("num_beams", 1), 1, 64),
        length_penalty=float(length_penalty),
        early_stopping=early,
        masks=tuple(merged.get("masks", ())),
        response_format=None if "response_format" not in merged else parse_response_format(merged["response_format"]),
    )
    if c.num_beams > 1 and (c.masks or c.response_format is not None):
        raise LlmosError("masks and response_format need sampling or greedy decoding, not beam search", param="num_beams")
    if c.num_beams > 1 and c.n > c.num_beams:
        raise LlmosError(f"n ({c.n}) must not exceed num_beams ({c.num_beams}) with beam search", param="n")
    return c


# --- prompt budget ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Budget:
    ids: list[int]
    max_new_tokens: int
    truncated: dict[str, Any] | None  # {"side", "removed_tokens"} when the prompt was cut


def fit_prompt(ids: list[int], controls: Controls, context: int, default_new: int) -> Budget:
    """Work out the token budget; never truncate silently."""
    if not ids:
        raise LlmosError("the prompt is empty: give some text (or at least one token)", param="prompt")
    asked = controls.max_new_tokens
    if asked is None and controls.max_length is not None:
        asked = controls.max_length - len(ids)
        if asked < 0:
            raise LlmosError(f"max_length ({controls.max_length}) is shorter than the prompt ({len(ids)} tokens)",
                             param="max_length")
    if asked is None:  # nothing asked: use what is left, up to the default
        if len(ids) < context:
            return Budget(ids, min(default_new, context - len(ids)), None)
        asked = 1
    if len(ids) + asked <= context:
        return Budget(ids, asked, None)
    if controls.truncate is None:
        raise ContextLengthError(
            f"the prompt ({len(ids)} tokens) plus max_new_tokens ({asked}) is {len(ids) + asked} tokens, more than "
            f"the model's context of {context}; shorten the prompt, ask for fewer tokens, or pass truncate='left'|'right'",
            prompt_tokens=len(ids), requested=controls.max_new_tokens, context=context)
    keep = context - asked
    if keep < 1:
        raise ContextLengthError(f"max_new_tokens ({asked}) leaves no room for the prompt in a context of {context} tokens",
                                 prompt_tokens=len(ids), requested=controls.max_new_tokens, context=context)
    removed = len(ids) - keep
    kept = ids[removed:] if controls.truncate == "left" else ids[:keep]
    return Budget(kept, asked, {"side": controls.truncate, "removed_tokens": removed})


# --- stop strings and loops ---------------------------------------------------------------------

class StopMatcher:
    """Holds back text that could be the start of a stop string until it is ruled out."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.text = ""  # everything received
        self.sent = 0  # characters of `text` already released

    def feed(self, piece: str) -> tuple[str, bool]:
        """(text now safe to release, whether a stop string was found)."""
        self.text += piece
        if not self.stops:
            return self._release(len(self.text)), False
        start = max(0, self.sent - max(len(s) for s in self.stops) + 1)
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            cut = min(hits)
            self.text = self.text[:cut]
            return self._release(cut), True
        return self._release(len(self.text) - self._held()), False

    def _held(self) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop string."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text) - self.sent), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best

    def flush(self) -> str:
        return self._release(len(self.text))

    def _release(self, upto: str | int) -> str:
        out = self.text[self.sent:upto]
        self.sent = max(self.sent, upto)
        return out


def repetition_loop(tokens: Sequence[int], min_span: int = 48, max_period: int = 32) -> bool:
    """True when the output's tail is one short pattern repeated over at least `min_span` tokens
    (and at least 4 times): the degenerate loop small models fall into."""
    n = len(tokens)
    for period in range(1, max_period + 1):
        span = max(min_span, 4 * period)
        if n < span:
            break
        tail = tokens[n - span:]
        if all(tail[i] == tail[i - period] for i in range(period, span)):
            return True
    return False


_SENTENCE_OR_LINE = re.compile(r"(?<=[.!?])\s+|\n+")
_MARKER = re.compile(r"^(?:[-*+\u2022]\s*|\(?[a-z0-9]{1,3}[.)]\s*)+")


def repeated_sentence(text: str, min_chars: int = 24) -> bool:
    """True when the last complete sentence or line of `text` (of at least `min_chars` characters)
    already appears earlier in it: a loop over a long sentence, which small models fall into in
    summaries and answers ("The answer to your question is: ..." again and again)."""
    if not text or text[-1] not in ".!?\n":
        return False
    # Compared without list markers: "(b) You may ...", "(c) You may ..." is the same sentence again.
    parts = [_MARKER.sub("", " ".join(p.split()).lower()) for p in _SENTENCE_OR_LINE.split(text)]
    parts = [p for p in parts if p]
    return len(parts) > 1 and len(parts[-1]) >= min_chars and parts[-1] in parts[:-1]


# --- results ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TokenLogprob:
    token: str
    id: int
    logprob: float
    top: tuple[tuple[str, int, float], ...] = ()  # (token text, id, logprob), most likely first


@dataclass
class Delta:
    index: int
    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class Choice:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[TokenLogprob] | None = None
    score: float | None = None  # beam search: the hypothesis score (length-normalised log-prob)


class Completion(str):
    """Text of the first choice, with `choices`, `prompt_tokens`, `completion_tokens`,
    `finish_reason`, `token_ids`, `logprobs` and `truncated` (None unless the prompt was cut)."""

    choices: list[Choice]
    prompt_tokens: int
    completion_tokens: int
    truncated: dict[str, Any] | None

    def __new__(cls, choices: list[Choice], prompt_tokens: int, truncated: dict[str, Any] | None = None) -> Completion:
        self = super().__new__(cls, choices[0].text)
        self.choices, self.prompt_tokens, self.truncated = choices, prompt_tokens, truncated
        self.completion_tokens = sum(len(c.token_ids) for c in choices)
        return self

    @property
    def finish_reason(self) -> str:
        return self.choices[0].finish_reason

    @property
    def token_ids(self) -> list[int]:
        return self.choices[0].token_ids

    @property
    def logprobs(self) -> list[TokenLogprob] | None:
        return self.choices[0].logprobs


# --- the loop -----------------------------------------------------------------------------------

class ChoiceState:
    """One choice's text as its tokens arrive, whatever produces them (the engine's `Generation`
    rows here, the server's batch engine there): UTF-8-safe detokenization, stop strings held back
    until ruled out, logprobs, the optional loop guard, and why the choice finished.

    `push` each generated token; once `finish_reason` is set (a stop string or a loop) the caller
    stops producing tokens for it. If the token source ends first, `finish` with its reason ("eos"
    or "length")."""

    def __init__(self, index: int, tokenizer: Tokenizer, stop: Sequence[str], repetition_guard: bool = False,
                 logprobs: bool = False) -> None:
        self.index = index
        self.decoder = tokenizer.decoder(skip_special_tokens=True)
        self.matcher = StopMatcher(stop)
        self.repetition_guard = repetition_guard
        self.ids: list[int] = []
        self.logprobs: list[TokenLogprob] | None = [] if logprobs else None
        self.finish_reason: str | None = None

    def push(self, token: int, logprob: TokenLogprob | None = None) -> Delta | None:
        """Take one generated token; returns the Delta to send, or None while its text is held back."""
        self.ids.append(token)
        new_lp = [logprob] if logprob is not None else []
        if self.logprobs is not None:
            self.logprobs.extend(new_lp)
        text, stopped = self.matcher.feed(self.decoder.push(token))
        if stopped:
            self.finish_reason = "stop"
        elif self.repetition_guard and (repetition_loop(self.ids) or repeated_sentence(self.matcher.text.rstrip(" "))):
            self.finish_reason = "repetition"
        if text or new_lp or self.finish_reason:
            return Delta(self.index, text, [token], new_lp, self.finish_reason)
        return None

    def finish(self, reason: str) -> Delta:
        """End the choice because its token source ended: release what was held back (a stop string
        found in that tail makes the reason "stop")."""
        tail, stopped = self.matcher.feed(self.decoder.flush())
        tail += "" if stopped else self.matcher.flush()
        self.finish_reason = "stop" if stopped else reason
        return Delta(self.index, tail, [], [], self.finish_reason)

    def choice(self) -> Choice:
        return Choice(self.index, self.matcher.text, self.ids, self.finish_reason or "length", self.logprobs)


class TextGeneration:
    """One request: runs the engine and yields Deltas. After exhaustion, `choices` holds the results.

    A caller that produces the tokens itself (the server's batch engine) builds the per-choice text
    state with `choice_state` and sets `choices` from it when the choice ends."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, budget: Budget, controls: Controls,
                 cache: KVCache | None = None, cached: int = 0, kv_dtype: torch.dtype | None = None) -> None:
        self.model, self.tokenizer, self.budget, self.controls = model, tokenizer, budget, controls
        self.kv_dtype = kv_dtype  # of the caches this request makes (None: the weights' dtype)
        self.cache, self.cached = cache, cached
        self.choices: list[Choice] = []
        self.generation: Generation | None = None
        self.should_stop: Callable[[], bool] | None = None  # asked between prefill chunks (see Generation)

    def choice_state(self, index: int = 0) -> ChoiceState:
        c = self.controls
        return ChoiceState(index, self.tokenizer, c.stop, c.repetition_guard, c.logprobs is not None)

    def __iter__(self) -> Iterator[Delta]:
        if self.controls.num_beams > 1:
            yield from self._beams()
            return
        c = self.controls
        gen = Generation(
            self.model, self.budget.ids, max_new_tokens=self.budget.max_new_tokens, params=c.params,
            stop_ids=self.tokenizer.stop_ids, min_new_tokens=c.min_new_tokens, n=c.n, seed=c.seed,
            cache=self.cache, cached=self.cached, logprobs=(c.logprobs or 0) + (1 if c.logprobs is not None else 0),
            masks=self.masks(), should_stop=self.should_stop, kv_dtype=self.kv_dtype,
        )
        self.generation = gen
        states = [self.choice_state(row) for row in range(c.n)]
        for step in gen:
            for row, token in enumerate(step):
                state = states[row]
                if token is None or state.finish_reason is not None:
                    continue
                delta = state.push(token, self._logprob(gen, row, token) if c.logprobs is not None else None)
                if delta is not None:
                    yield delta
            if all(s.finish_reason is not None for s in states):
                break
        for row, state in enumerate(states):
            if state.finish_reason is None:
                yield state.finish(gen.finish_reasons[row] or "length")
        self.choices = [s.choice() for s in states]

    def masks(self) -> tuple[LogitsMask, ...]:
        """The request's logits masks: its own, then the JSON constraint its response_format asks for."""
        rf = self.controls.response_format
        extra = () if rf is None else (rf.mask(self.tokenizer, len(self.budget.ids)),)
        return self.controls.masks + extra

    def _logprob(self, gen: Generation, row: int, token: int) -> TokenLogprob:
        chosen, top_ids, top_vals = gen.last_logprobs
        k = self.controls.logprobs or 0
        piece = self.tokenizer.decode
        top = tuple((piece([int(i)]), int(i), float(v)) for i, v in zip(top_ids[row, :k].tolist(), top_vals[row, :k].tolist()))
        return TokenLogprob(piece([token]), token, float(chosen[row]), top)

    def _beams(self) -> Iterator[Delta]:
        from llmos.engine.beam import beam_search

        c = self.controls
        beams = beam_search(
            self.model, self.budget.ids, num_beams=c.num_beams, max_new_tokens=self.budget.max_new_tokens,
            length_penalty=c.length_penalty, early_stopping=c.early_stopping, stop_ids=self.tokenizer.stop_ids,
            num_return_sequences=c.n, params=c.params, min_new_tokens=c.min_new_tokens, kv_dtype=self.kv_dtype,
        )
        for row, beam in enumerate(beams):
            matcher = StopMatcher(c.stop)
            decoder = self.tokenizer.decoder(skip_special_tokens=True)  # drops a character cut by the length limit
            text, stopped = matcher.feed("".join(map(decoder.push, beam.tokens)) + decoder.flush())
            text += "" if stopped else matcher.flush()
            reason = "stop" if stopped else beam.finish_reason
            self.choices.append(Choice(row, matcher.text, list(beam.tokens), reason, None, beam.score))
            yield Delta(row, text, list(beam.tokens), [], reason)


def complete(run: TextGeneration) -> Completion:
    for _ in run:
        pass
    return Completion(run.choices, len(run.budget.ids), run.budget.truncated)
