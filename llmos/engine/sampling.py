"""Sampling: pure functions from logits to the next token.

Every function takes logits (B, V) float32 and returns new logits or token ids; none keeps state.
Penalties follow the meaning users know: `repetition_penalty` and `no_repeat_ngram_size` as in
transformers (over prompt and output), `presence_penalty`/`frequency_penalty` as in the OpenAI API
(over the output only). Order, as transformers and vLLM apply them: bias and penalties, then
suppressed ids (stop ids under min_new_tokens), then the caller's masks (constrained decoding), then
temperature, top-k, top-p, min-p, then a draw from the seeded generator. Each function gives the same tensor as the transformers processor of the
same name (tests/engine/test_sampling.py), ties and -inf included.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from llmos.errors import LlmosError


# A logits mask: (logits (B, V), ids so far (B, N)) -> logits with the disallowed tokens at -inf.
LogitsMask = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

TINY = 1e-30  # a temperature or penalty below this can overflow a logit to inf when it divides it


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy (argmax)
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    no_repeat_ngram_size: int = 0
    logit_bias: dict[int, float] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        check_range("temperature", self.temperature, 0.0, None, "a finite number >= 0 (0 is greedy)")
        if not is_int(self.top_k) or self.top_k < 0:
            raise LlmosError(f"top_k must be an integer >= 0 (0 turns it off), got {self.top_k!r}", param="top_k")
        check_range("top_p", self.top_p, 0.0, 1.0, "a number in (0, 1] (1 turns it off)")
        if self.top_p == 0.0:
            raise LlmosError(f"top_p must be a number in (0, 1] (1 turns it off), got {self.top_p!r}", param="top_p")
        check_range("min_p", self.min_p, 0.0, 1.0, "a number in [0, 1] (0 turns it off)")
        check_range("repetition_penalty", self.repetition_penalty, 0.0, None, "a finite number > 0 (1 turns it off)")
        if self.repetition_penalty == 0.0:
            raise LlmosError(f"repetition_penalty must be a finite number > 0 (1 turns it off), got {self.repetition_penalty!r}",
                             param="repetition_penalty")
        check_range("presence_penalty", self.presence_penalty, -2.0, 2.0, "a number in [-2, 2]")
        check_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0, "a number in [-2, 2]")
        if not is_int(self.no_repeat_ngram_size) or self.no_repeat_ngram_size < 0:
            raise LlmosError(f"no_repeat_ngram_size must be an integer >= 0 (0 turns it off), got {self.no_repeat_ngram_size!r}",
                             param="no_repeat_ngram_size")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise LlmosError(f"logit_bias must be a dict of token id -> bias, got {self.logit_bias!r}", param="logit_bias")
            for token, bias in self.logit_bias.items():
                if not is_int(token) or token < 0:
                    raise LlmosError(f"logit_bias keys must be token ids (integers >= 0), got {token!r}", param="logit_bias")
                # -inf is allowed: it bans the token; +inf or NaN would make every probability NaN.
                if isinstance(bias, bool) or not isinstance(bias, (int, float)) or math.isnan(bias) or bias == math.inf:
                    raise LlmosError(f"logit_bias values must be finite numbers (or -inf to ban), got {bias!r} for token {token}",
                                     param="logit_bias")

    @property
    def greedy(self) -> bool:
        # A temperature too small for float32 to divide by (1e-300 is 0 there) is its limit, argmax.
        return self.temperature < TINY

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing that changes the logits first (bias, penalties): the token is their argmax."""
        return self.greedy and not self.logit_bias and not self.needs_history and not self.needs_output

    @property
    def needs_history(self) -> bool:
        """Whether a penalty reads the prompt and output ids (repetition, no-repeat n-grams)."""
        return self.repetition_penalty != 1.0 or self.no_repeat_ngram_size > 0

    @property
    def needs_output(self) -> bool:
        """Whether a penalty reads the output ids (OpenAI presence/frequency)."""
        return bool(self.presence_penalty or self.frequency_penalty)


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_range(name: str, value: object, lo: float | None, hi: float | None, allowed: str) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (lo is None or value >= lo) and (hi is None or value <= hi)
    if not ok:
        raise LlmosError(f"{name} must be {allowed}, got {value!r}", param=name)


def apply_logit_bias(logits: torch.Tensor, bias: dict[int, float]) -> torch.Tensor:
    """Add `bias[token]` to each listed token's logit (transformers' single-token sequence_bias)."""
    vocab = logits.shape[-1]
    outside = sorted(t for t in bias if not 0 <= t < vocab)
    if outside:
        raise LlmosError(f"logit_bias token ids must be in [0, {vocab - 1}] (the model's vocabulary), got {outside}",
                         param="logit_bias")
    ids = torch.tensor(list(bias.keys()), dtype=torch.long)
    vals = torch.tensor(list(bias.values()), dtype=logits.dtype)
    return logits.index_add(-1, ids, vals.expand(logits.shape[0], -1))


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' rule: a seen token's logit is divided by `penalty` if positive, else multiplied."""
    seen = logits.gather(-1, history)  # (B, N)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return logits.scatter(-1, history, seen)


def apply_presence_frequency(logits: torch.Tensor, output: torch.Tensor, presence: float, frequency: float) -> torch.Tensor:
    """OpenAI's rule: logit -= frequency * count + presence * (count > 0), over output tokens."""
    counts = torch.zeros_like(logits).scatter_add_(-1, output, torch.ones_like(output, dtype=logits.dtype))
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def banned_ngram_tokens(history: list[int], n: int) -> set[int]:
    """Tokens that would complete an n-gram already present in `history` (transformers' rule)."""
    if len(history) + 1 < n:
        return set()
    prefix = tuple(history[len(history) - n + 1:])
    banned = set()
    for i in range(len(history) - n + 1):
        if tuple(history[i:i + n - 1]) == prefix:
            banned.add(history[i + n - 1])
    return banned


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, -math.inf)


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p (at least one).

    Computed as transformers' TopPLogitsWarper does, so ties and rounding fall the same way: sort
    ascending, and drop each token whose cumulative probability, counted from the least likely up
    to and including it, is at most 1 - p (the mass of the tokens above it is then at least p).
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= (1 - p)
    drop_sorted[..., -1:] = False  # the most likely token always stays
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, -math.inf)


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the top token's."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, -math.inf)


def process(
    logits: torch.Tensor,
    params: SamplingParams,
    history: torch.Tensor | None = None,
    output: torch.Tensor | None = None,
    suppress: torch.Tensor | None = None,
    masks: Sequence[LogitsMask] = (),
    ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply bias, penalties, masks and warpers to logits (B, V); history/output are token ids (B, N).

    `suppress`: token ids (S,) set to -inf after the penalties and before the warpers, where
    transformers' MinNewTokensLengthLogitsProcessor bans stop ids. `masks` run next, each given the
    logits and `ids` (B, N), the prompt and output so far. Top-k/top-p/min-p then choose among the
    tokens that remain allowed.
    """
    if params.logit_bias:
        logits = apply_logit_bias(logits, params.logit_bias)
    if params.repetition_penalty != 1.0 and history is not None and history.numel():
        logits = apply_repetition_penalty(logits, history, params.repetition_penalty)
        if params.repetition_penalty < TINY:  # a divisor float32 holds as 0 (or nearly): logits become +inf
            logits = _no_overflow(logits)
    if (params.presence_penalty or params.frequency_penalty) and output is not None and output.numel():
        logits = apply_presence_frequency(logits, output, params.presence_penalty, params.frequency_penalty)
    if params.no_repeat_ngram_size and history is not None:
        logits = logits.clone()
        for row in range(logits.shape[0]):
            banned = banned_ngram_tokens(history[row].tolist(), params.no_repeat_ngram_size)
            if banned:
                logits[row, list(banned)] = -math.inf
    if suppress is not None and suppress.numel():
        logits = logits.index_fill(-1, suppress, -math.inf)
    for mask in masks:
        logits = mask(logits, ids)
    if params.greedy:
        return logits
    if params.temperature != 1.0:
        logits = logits / params.temperature
        if params.repetition_penalty < TINY:  # its largest floats, divided again
            logits = _no_overflow(logits)
    logits = apply_top_k(logits, params.top_k)
    logits = apply_top_p(logits, params.top_p)
    return apply_min_p(logits, params.min_p)


def _no_overflow(logits: torch.Tensor) -> torch.Tensor:
    """+inf (a finite logit divided by a denormal) as the largest float: softmax of two +infs is NaN,
    of two largest floats a fair split. -inf stays: it means banned."""
    return torch.nan_to_num(logits, nan=-math.inf, posinf=torch.finfo(logits.dtype).max)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from processed logits (B, V)."""
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = logits.float().softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
