"""The decode loop: prefill a prompt, then decode one token at a time with a KV cache.

The engine sees token ids only; text, stop strings and chat templates live above it. A `Generation`
runs `n` rows from one prompt (num_return_sequences) and yields, per step, one id per row (None for
rows that already finished). Each row ends on a stop id ("eos", the id itself is not yielded) or after
`max_new_tokens` ("length"); `finish_reasons` holds why. Sampling is drawn from one generator seeded
with `seed`, so the same seed gives the same tokens.

A caller that keeps a KVCache between calls (a chat whose history grows) passes it with `cached`, the
number of leading prompt tokens already in it; only the rest is prefilled.

A caller that may give up (a server whose client left) passes `should_stop`: it is asked between
prefill chunks, so a long prompt stops within one chunk; the rows then finish as "cancelled".
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from llmos import threads
from llmos.engine.sampling import LogitsMask, SamplingParams, process, sample
from llmos.errors import LlmosError
from llmos.models.kv_cache import KVCache, cache_dtype


def new_generator(seed: int | None) -> torch.Generator:
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1)
    return torch.Generator().manual_seed(int(seed))


@torch.inference_mode()
def prefill(model: nn.Module, tokens: torch.Tensor, start: int, cache: KVCache, chunk: int = 512,
            should_stop: Callable[[], bool] | None = None) -> torch.Tensor | None:
    """Run tokens (B, T) at positions start.. into the cache; return last-position logits (B, V) fp32,
    or None when `should_stop()` said so before a chunk."""
    T = tokens.shape[1]
    hidden = None
    cache.extent = start + T  # where the prompt ends, for models whose rotation depends on it (LongRoPE)
    for s in range(0, T, chunk):
        if should_stop is not None and should_stop():
            return None
        part = tokens[:, s:s + chunk]
        positions = torch.arange(start + s, start + s + part.shape[1])
        hidden = model.hidden(part, positions, cache)
    return model.logits(hidden[:, -1]).float()


def restarts(model: nn.Module, start: int, end: int) -> bool:
    """Whether a forward over positions start..end-1 must run the whole sequence from position 0
    instead: a LongRoPE model (Phi-3) rotates a sequence that has passed its original context with
    other frequencies (`config.rope_switch`), so the keys cached before it got there are stale.
    transformers drops them and runs the sequence again at that step (Phi3ForCausalLM's
    prepare_inputs_for_generation: past length <= original context < new length), and so does llmos."""
    switch = model.config.rope_switch
    return switch is not None and 0 < start <= switch < end


def decode_one(model: nn.Module, token: torch.Tensor, position: int, cache: KVCache) -> torch.Tensor:
    """One decode step for tokens (B,) at `position`; logits (B, V) fp32."""
    return decode(model, token, torch.tensor([position]), cache)


@torch.inference_mode()
def decode(model: nn.Module, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """One decode step, tokens (B,) at `positions` (1,) or per row (B, 1): logits (B, V) fp32. The
    model's kernels run the whole step where they can (the native C++ step), else its Python forward."""
    logits = model.kernels.decode(model, tokens, positions, cache)
    if logits is not None:
        return logits
    hidden = model.hidden(tokens[:, None], positions, cache)  # (B, 1, C)
    return model.logits(hidden[:, -1]).float()


class Generation:
    def __init__(
        self,
        model: nn.Module,
        prompt: Sequence[int],
        *,
        max_new_tokens: int,
        params: SamplingParams = SamplingParams(temperature=0.0),
        stop_ids: frozenset[int] = frozenset(),
        min_new_tokens: int = 0,
        n: int = 1,
        seed: int | None = None,
        cache: KVCache | None = None,
        cached: int = 0,
        logprobs: int = 0,
        masks: Sequence[LogitsMask] = (),
        should_stop: Callable[[], bool] | None = None,
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        """`logprobs`: after each step, `last_logprobs` holds (chosen (B,), top ids (B, k), top
        values (B, k)) from the model's own distribution (log-softmax of the raw logits), as the
        OpenAI API reports them. `masks`: functions (logits (B, V), ids so far (B, N)) -> logits,
        applied after the penalties and before the warpers (constrained decoding plugs in here).
        `kv_dtype`: the dtype of a new KV cache (None: the weights'; the quantized forms use fp16)."""
        if not prompt:
            raise LlmosError("the prompt is empty: give at least one token")
        if max_new_tokens < 0:
            raise LlmosError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if n < 1:
            raise LlmosError(f"n (num_return_sequences) must be >= 1, got {n}")
        total = len(prompt) + max_new_tokens
        context = model.config.max_seq_len
        if total > context:
            raise LlmosError(
                f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) = {total} exceeds the "
                f"model's context of {context} tokens; shorten the prompt or ask for fewer tokens"
            )
        self.model, self.prompt, self.params = model, list(prompt), params
        self.max_new_tokens, self.min_new_tokens, self.n = max_new_tokens, min_new_tokens, n
        self.stop_ids = frozenset(stop_ids)
        self.generator = new_generator(seed)
        if cache is None or cache.max_len < total or cache.k.shape[1] != n:
            cache, cached = KVCache.for_model(model.config, n, total, cache_dtype(model, kv_dtype)), 0
        self.cache, self.cached = cache, min(cached, len(prompt) - 1)  # at least one token to prefill
        self.finish_reasons: list[str | None] = [None] * n
        self.stop_tokens: list[int | None] = [None] * n  # the stop id each row ended on
        self.logprobs, self.masks = logprobs, tuple(masks)
        self.should_stop = should_stop
        self.last_logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.generated = 0
        threads.refresh()  # llmos's own thread count follows the machine's other work (llmos/threads.py)

    def __iter__(self) -> Iterator[list[int | None]]:
        n, T = self.n, len(self.prompt)
        history = torch.empty(n, T + self.max_new_tokens, dtype=torch.long)
        history[:, :T] = torch.tensor(self.prompt)
        needs_history, needs_output = self.params.needs_history, self.params.needs_output
        stop = torch.tensor(sorted(self.stop_ids), dtype=torch.long)
        done = torch.zeros(n, dtype=torch.bool)
        if self.max_new_tokens == 0:
            self.finish_reasons = ["length"] * n
            return
        if restarts(self.model, self.cached, T):
            self.cached = 0
        self.cache.length = self.cached
        rest = history[:, self.cached:T]
        logits = prefill(self.model, rest, self.cached, self.cache, should_stop=self.should_stop)
        if logits is None:
            self.finish_reasons = ["cancelled"] * n
            return
        for step in range(self.max_new_tokens):
            cur = T + step
            raw = logits
            logits = process(
                logits,
                self.params,
                history[:, :cur] if needs_history else None,
                history[:, T:cur] if needs_output else None,
                suppress=stop if step < self.min_new_tokens and stop.numel() else None,
                masks=self.masks, ids=history[:, :cur] if self.masks else None,
            )
            token = sample(logits, self.params, self.generator)  # (B,)
            if self.logprobs:
                lp = raw.log_softmax(dim=-1)  # (B, V)
                top = lp.topk(self.logprobs, dim=-1)
                self.last_logprobs = (lp.gather(-1, token[:, None])[:, 0], top.indices, top.values)
            history[:, cur] = token
            hit = torch.isin(token, stop) & ~done if stop.numel() else torch.zeros_like(done)
            out: list[int | None] = []
            for row, (t, h, d) in enumerate(zip(token.tolist(), hit.tolist(), done.tolist())):
                if h:
                    self.finish_reasons[row], self.stop_tokens[row] = "eos", t
                out.append(None if (d or h) else t)
            done |= hit
            self.generated = step + 1
            if all(o is None for o in out) and bool(done.all()):
                return
            yield out
            if step + 1 == self.max_new_tokens:
                break
            if restarts(self.model, cur, cur + 1):
                logits = prefill(self.model, history[:, :cur + 1], 0, self.cache)
            else:
                logits = decode_one(self.model, token, cur, self.cache)
        for row in range(n):
            if self.finish_reasons[row] is None:
                self.finish_reasons[row] = "length"

    def tokens(self) -> Iterator[int]:
        """Row 0's tokens, one int at a time (the common n=1 case)."""
        for step in self:
            if step[0] is not None:
                yield step[0]
