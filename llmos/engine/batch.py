"""Continuous batching: many sequences decoded in one forward pass, joining and leaving at any step.

A `BatchEngine` owns one KV cache with `max_batch` rows. Active sequences occupy rows 0..n-1 (kept
compact: a finished sequence's row is refilled by moving the last row into it), so every decode step
is one forward over a contiguous view of the cache with per-row positions. New requests are
admitted between steps: each step prefills up to `prefill_chunk` prompt tokens into free rows (a long
prompt over several steps, several short ones in one), so a long prompt never stalls the sequences
already decoding for more than one chunk, and a burst of short requests starts decoding together.
Requests that share a prompt prefix with a live sequence copy that prefix's keys/values instead of
recomputing them (except under LongRoPE, where a key depends on its sequence's length); a row that
passes LongRoPE's original context is run again whole, as it would be alone (generate.py `restarts`).

Each request samples from its own seeded generator with its own controls, so it gets exactly the
tokens it would get alone (given equal logits: greedy and same-seed sampling agree). The engine sees
token ids only.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from llmos import threads
from llmos.engine.generate import decode, new_generator, prefill, restarts
from llmos.engine.sampling import SamplingParams, process, sample
from llmos.errors import LlmosError
from llmos.models.kv_cache import KVCache, cache_dtype


@dataclass
class Request:
    prompt: list[int]
    max_new_tokens: int
    params: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0.0))
    stop_ids: frozenset[int] = frozenset()
    min_new_tokens: int = 0
    seed: int | None = None
    id: int = field(default_factory=itertools.count().__next__)
    # Filled in by the engine:
    output: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "eos" | "length" | "cancelled"

    def __post_init__(self) -> None:
        self.generator = new_generator(self.seed)
        self.prefilled = 0  # prompt tokens already in the cache
        self.row = -1
        self.stop = torch.tensor(sorted(self.stop_ids), dtype=torch.long)
        # prompt + output ids, allocated once when a penalty first reads them (1, prompt + max new)
        self.history: torch.Tensor | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Event:
    request: Request
    token: int | None  # None when the request finished without a new token (eos, cancel)
    finished: bool


class BatchEngine:
    def __init__(self, model: nn.Module, max_batch: int = 16, max_len: int | None = None, prefill_chunk: int = 256,
                 share_prefixes: bool = True, kv_dtype: torch.dtype | None = None) -> None:
        config = model.config
        self.model, self.max_batch, self.chunk = model, max_batch, prefill_chunk
        self.max_len = min(max_len or config.max_seq_len, config.max_seq_len)
        self.cache = KVCache.for_model(config, max_batch, self.max_len, cache_dtype(model, kv_dtype))
        self.rows: list[Request] = []  # decoding, in row order 0..n-1
        self.prefilling: Request | None = None  # the one request being prefilled, in row len(rows)
        self.waiting: deque[Request] = deque()
        self.share_prefixes = share_prefixes
        self.pending_logits: dict[int, torch.Tensor] = {}  # request id -> logits (V,) of its next token
        # request id -> argmax of those logits, taken for all plain greedy rows of a step at once
        self.pending_argmax: dict[int, int] = {}
        self.prefix_tokens_reused = 0

    # --- admission ------------------------------------------------------------------------------
    def submit(self, request: Request) -> Request:
        total = len(request.prompt) + request.max_new_tokens
        if not request.prompt:
            raise LlmosError("the prompt is empty: give at least one token")
        if total > self.max_len:
            raise LlmosError(
                f"prompt ({len(request.prompt)} tokens) + max_new_tokens ({request.max_new_tokens}) = {total} exceeds "
                f"the engine's {self.max_len}-token slots; shorten the prompt or ask for fewer tokens"
            )
        self.waiting.append(request)
        return request

    def cancel(self, request: Request) -> None:
        """Stop a request; its row is freed at once."""
        if request.done:
            return
        request.finish_reason = "cancelled"
        if request in self.waiting:
            self.waiting.remove(request)
        elif request is self.prefilling:
            self.prefilling = None
        elif request in self.rows:
            self._free(request)

    @property
    def active(self) -> int:
        return len(self.rows) + (self.prefilling is not None)

    @property
    def idle(self) -> bool:
        return not self.rows and self.prefilling is None and not self.waiting

    # --- one scheduler step ---------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[Event]:
        """Prefill one chunk of a waiting prompt (if any) and decode one token for every running
        sequence. Returns what happened to each request this step."""
        events: list[Event] = []
        threads.refresh()  # llmos's own thread count follows the machine's other work (llmos/threads.py)
        self._prefill()
        if self.rows:
            events += self._decode()
        return events

    def _prefill(self) -> None:
        """Prefill up to `self.chunk` prompt tokens: the request being prefilled, then waiting ones
        while rows are free."""
        budget = self.chunk
        while budget > 0:
            if self.prefilling is None:
                if not self.waiting or len(self.rows) >= self.max_batch:
                    return
                req = self.waiting.popleft()
                req.row = len(self.rows)
                self.prefilling = req
                # A LongRoPE key depends on how long its sequence is, not only on its token and position.
                if self.share_prefixes and self.model.config.rope_switch is None:
                    self._reuse_prefix(req)
            req = self.prefilling
            row = self.cache.rows(req.row, req.row + 1)
            row.extent = len(req.prompt)  # where the prompt ends, for LongRoPE (kv_cache.py)
            start = req.prefilled
            part = req.prompt[start:start + budget]
            hidden = self.model.hidden(torch.tensor([part]), torch.arange(start, start + len(part)), row)
            req.prefilled += len(part)
            budget -= len(part)
            if req.prefilled == len(req.prompt):
                self.pending_logits[req.id] = self.model.logits(hidden[0, -1]).float()
                self.rows.append(req)
                self.prefilling = None

    def _reuse_prefix(self, req: Request) -> None:
        """Copy the longest shared prompt prefix from a running sequence's row."""
        best, source = 0, None
        for other in self.rows:
            seq = other.prompt + other.output
            n = 0
            limit = min(len(seq), len(req.prompt) - 1, other.prefilled + len(other.output) - 1)
            while n < limit and seq[n] == req.prompt[n]:
                n += 1
            if n > best:
                best, source = n, other
        if source is not None and best > 0:
            self.cache.k[:, req.row, :, :best] = self.cache.k[:, source.row, :, :best]
            self.cache.v[:, req.row, :, :best] = self.cache.v[:, source.row, :, :best]
            req.prefilled = best
            self.prefix_tokens_reused += best

    def _decode(self) -> list[Event]:
        events: list[Event] = []
        for req in list(self.rows):
            logits = self.pending_logits.pop(req.id)[None]  # (1, V)
            best = self.pending_argmax.pop(req.id, None)
            params = req.params
            suppress = req.stop if len(req.output) < req.min_new_tokens and req.stop.numel() else None
            if best is not None and suppress is None:  # plain greedy: process() would leave the logits as they are
                events += self._accept(req, best)
                continue
            needs_history, needs_output = params.needs_history, params.needs_output
            history = None
            if needs_history or needs_output:  # only when a penalty reads them
                n = len(req.prompt) + len(req.output)
                if req.history is None:
                    req.history = torch.empty(1, len(req.prompt) + req.max_new_tokens, dtype=torch.long)
                    req.history[0, :n] = torch.tensor(req.prompt + req.output)
                history = req.history[:, :n]  # (1, N)
            logits = process(
                logits, params,
                history if needs_history else None,
                history[:, len(req.prompt):] if needs_output else None,
                suppress=suppress,
            )
            events += self._accept(req, int(sample(logits, params, req.generator)[0]))
        live = self.rows
        if live:
            tokens = [r.output[-1] for r in live]
            positions = torch.tensor([[len(r.prompt) + len(r.output) - 1] for r in live])  # (B, 1)
            if len(live) == 1:  # alone: shared positions (T,) take the model's unmasked single-sequence path
                positions = positions[0]  # (1,)
            logits = decode(self.model, torch.tensor(tokens), positions, self.cache.rows(0, len(live)))  # (B, V)
            for i, r in enumerate(live if self.model.config.rope_switch is not None else ()):
                end = len(r.prompt) + len(r.output)
                if restarts(self.model, end - 1, end):  # LongRoPE past its original context: this row anew
                    logits[i] = prefill(self.model, torch.tensor([r.prompt + r.output]), 0, self.cache.rows(i, i + 1))[0]
            best = logits.argmax(dim=-1).tolist() if any(r.params.plain_greedy for r in live) else []  # one call a step
            for i, (r, row_logits) in enumerate(zip(live, logits)):
                self.pending_logits[r.id] = row_logits
                if r.params.plain_greedy:
                    self.pending_argmax[r.id] = best[i]
        return events

    def _accept(self, req: Request, token: int) -> list[Event]:
        """Record a request's next token: it ends the request on a stop id or at its length."""
        if token in req.stop_ids:
            req.finish_reason = "eos"
            self._free(req)
            return [Event(req, None, True)]
        req.output.append(token)
        if req.history is not None:
            req.history[0, len(req.prompt) + len(req.output) - 1] = token
        if len(req.output) >= req.max_new_tokens:
            req.finish_reason = "length"
            self._free(req)
            return [Event(req, token, True)]
        return [Event(req, token, False)]

    def _free(self, req: Request) -> None:
        """Remove a decoding request, moving the last row into its place to keep rows compact."""
        self.pending_logits.pop(req.id, None)
        self.pending_argmax.pop(req.id, None)
        i = self.rows.index(req)
        last = len(self.rows) - 1
        if i != last:
            moved = self.rows[last]
            self._move_row(last, i, len(moved.prompt) + len(moved.output))
            moved.row = i
            self.rows[i] = moved
        self.rows.pop()
        if self.prefilling is not None and self.prefilling.row != len(self.rows):
            # The prompt being prefilled sits right after the decoding rows: move it down too.
            self._move_row(self.prefilling.row, len(self.rows), self.prefilling.prefilled)
            self.prefilling.row = len(self.rows)
        req.row = -1

    def _move_row(self, source: int, target: int, length: int) -> None:
        """Copy a row's first `length` cached positions (all it has written) to another row; later
        positions are masked out of attention, so a long slot costs no more to move than it holds."""
        n = min(length, self.max_len)
        self.cache.k[:, target, :, :n] = self.cache.k[:, source, :, :n]  # (L, H, n, D)
        self.cache.v[:, target, :, :n] = self.cache.v[:, source, :, :n]

    def run(self, requests: Sequence[Request]) -> list[Request]:
        """Submit and run to completion (a convenience for offline batches and tests)."""
        for r in requests:
            self.submit(r)
        while not self.idle:
            self.step()
        return list(requests)
