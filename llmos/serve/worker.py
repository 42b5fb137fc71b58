"""The request path's engine room: one background thread owns the model and runs every generation.

Routes validate a request and `submit` it; they get a `Ticket`, an async iterator of `Delta`s. The
worker thread pushes each delta into its ticket's asyncio queue with `loop.call_soon_threadsafe`.
Each turn of the thread advances every active request, in one of two ways:

- Batched: a request the continuous-batching engine runs exactly as it would run alone (one choice,
  no beams, no logprobs, no logits masks or response_format, prompt + max tokens within the
  engine's slot) joins the worker's `BatchEngine`. One turn is one engine step: a single forward
  pass decodes a token for every such request at once. Each token goes through the request's `ChoiceState` (detokenization,
  stop strings, the loop guard: the same code `TextGeneration` runs) to become its Deltas; a choice
  that ends on a stop string or a loop leaves the engine at once.
- Round-robin: every other request runs its own `TextGeneration`, advanced by one delta per turn.

Contract:
- `submit` validates on the caller's thread (`LLM.start` raises `LlmosError` before anything is
  queued), so a bad request fails before any response starts.
- At most `max_active` generations run at once; up to `max_queue` more wait. Past that, `submit`
  raises `QueueFull` (the route answers 503 with Retry-After).
- `Ticket.cancel()` (a client went away) takes effect at the worker's next turn: the generation is
  closed (or leaves the batch engine) and its slot freed.
- `stop()` refuses new work, lets what is queued and running finish, then ends the thread.
- A failure fails only the requests it touched: one generation's error ends that ticket; a failed
  engine step (one forward pass for all batched requests) ends every batched ticket with it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from typing import Any

from llmos.api import LLM
from llmos.config import ModelConfig
from llmos.engine.batch import BatchEngine, Event, Request
from llmos.generation import ChoiceState, Delta, TextGeneration

log = logging.getLogger("llmos.serve")

_END = object()

SLOT_LEN = 2048  # positions per batch-engine row (prompt + max tokens), at most the model's context
KV_BUDGET = 2 << 30  # bytes the batch engine's KV cache may hold; its slots shrink to fit
MIN_SLOT = 256


def slot_len(config: ModelConfig, rows: int) -> int:
    """Positions per batch-engine row: SLOT_LEN, or fewer where the model's context or KV_BUDGET
    says so. Longer requests run round-robin (the engine preallocates every row in full)."""
    per_position = 2 * config.n_layers * config.n_kv_heads * config.head_size * 4  # k and v, fp32
    return min(config.max_seq_len, max(MIN_SLOT, min(SLOT_LEN, KV_BUDGET // (rows * per_position))))


class QueueFull(Exception):
    """The server has as many requests as it accepts; try again later."""


class WorkerError(Exception):
    """A generation failed inside the worker (after the request was accepted)."""


class Aborted(Exception):
    """The server cut this generation short (its shutdown grace period ran out)."""


_ABORT = object()


class Ticket:
    """One submitted generation: `async for delta in ticket`, or `cancel()` it. `prompt_tokens` is the
    prompt the request was accepted with."""

    def __init__(self, run: TextGeneration, loop: asyncio.AbstractEventLoop) -> None:
        self.run = run
        self.prompt_tokens = len(run.budget.ids)
        self.cancelled = False
        self._loop = loop
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._iter: Iterator[Delta] | None = None
        self._request: Request | None = None  # set when the batch engine runs it
        self._state: ChoiceState | None = None  # its text state, once it has joined the engine
        self._done = False
        self._on_cancel: Any = None

    # --- consumer side (event loop thread) -------------------------------------------------------
    def __aiter__(self) -> Ticket:
        return self

    async def __anext__(self) -> Delta:
        if self._done:
            raise StopAsyncIteration
        item = await self._queue.get()
        if item is _END:
            self._done = True
            raise StopAsyncIteration
        if item is _ABORT:
            self._done = True
            raise Aborted("the server is shutting down")
        if isinstance(item, BaseException):
            self._done = True
            raise WorkerError(str(item) or type(item).__name__) from item
        return item

    def abort(self) -> None:
        """Stop this generation and tell its consumer so (`Aborted` after the deltas already sent)."""
        if not self.cancelled:
            self._queue.put_nowait(_ABORT)
        self.cancel()

    def cancel(self) -> None:
        """Stop this generation (idempotent): the worker drops it at its next step."""
        if self.cancelled:
            return
        self.cancelled = True
        self._queue.put_nowait(_END)  # wake a consumer waiting on the queue
        if self._on_cancel is not None:
            self._on_cancel()

    # --- producer side (worker thread) -----------------------------------------------------------
    def _push(self, item: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancelled = True


class Worker:
    """Runs generations on one thread; see the module docstring for the contract."""

    def __init__(self, llm: LLM, *, max_active: int = 16, max_queue: int = 64, batch: bool = True,
                 slot: int | None = None) -> None:
        """`batch`: run what it can on the batch engine (False: everything round-robin); `slot`:
        the engine's positions per row (default `slot_len`)."""
        if max_active < 1 or max_queue < 0:
            raise ValueError(f"max_active must be >= 1 and max_queue >= 0, got {max_active}, {max_queue}")
        self.llm, self.max_active, self.max_queue = llm, max_active, max_queue
        self.engine: BatchEngine | None = None
        if batch:
            self.engine = BatchEngine(llm.model, max_batch=max_active, max_len=slot or slot_len(llm.config, max_active),
                                      kv_dtype=llm.kv_dtype)
        self._batched: dict[int, Ticket] = {}  # engine request id -> ticket (worker thread only)
        self._batch_sizes: Counter[int] = Counter()  # engine decode steps by the rows they decoded
        self._pending: deque[Ticket] = deque()
        self._active: list[Ticket] = []
        self._cond = threading.Condition()
        self._accepting = True
        self._stopping = False
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) over the last WINDOW seconds
        self._thread = threading.Thread(target=self._run, name="llmos-worker", daemon=True)
        self._thread.start()

    WINDOW = 10.0

    @property
    def queue_depth(self) -> int:
        """Requests accepted but not yet started."""
        return len(self._pending)

    @property
    def active(self) -> int:
        """Requests generating now."""
        return len(self._active)

    def batch_sizes(self) -> dict[int, int]:
        """Batch-engine decode steps so far, by how many sequences each decoded together."""
        with self._cond:
            return dict(self._batch_sizes)

    def tokens_per_second(self) -> float:
        """Completion tokens per second over the last WINDOW seconds, all requests together."""
        with self._cond:
            self._prune(time.monotonic())
            return sum(n for _, n in self._recent) / self.WINDOW

    def submit(self, ids: list[int], controls: dict[str, Any], defaults: dict[str, Any] | None = None,
               *, default_new: int = 256) -> Ticket:
        """Validate and enqueue a generation; must be called from the event loop's thread.

        Raises LlmosError (invalid controls, prompt over the context) or QueueFull."""
        run = self.llm.start(ids, controls, defaults=defaults, default_new=default_new)
        ticket = Ticket(run, asyncio.get_running_loop())
        run.should_stop = lambda: ticket.cancelled  # a client that left stops a long prefill within a chunk
        ticket._request = self._engine_request(run)
        with self._cond:
            if not self._accepting:
                raise QueueFull("the server is shutting down")
            if len(self._active) < self.max_active and not self._pending:
                self._active.append(ticket)
            elif len(self._pending) < self.max_queue:
                self._pending.append(ticket)
            else:
                raise QueueFull(f"the server is busy: {len(self._active)} requests running, {len(self._pending)} waiting")
            ticket._on_cancel = self._wake
            self._cond.notify()
        return ticket

    def _engine_request(self, run: TextGeneration) -> Request | None:
        """The batch engine's request for `run`, or None where only its own loop runs it exactly."""
        if self.engine is None:
            return None
        c, budget = run.controls, run.budget
        bias = c.params.logit_bias or {}
        exact = c.n == 1 and c.num_beams == 1 and c.logprobs is None
        exact = exact and not c.masks and c.response_format is None
        fits = 1 <= budget.max_new_tokens and len(budget.ids) + budget.max_new_tokens <= self.engine.max_len
        # A token the sampler would refuse fails the whole engine step: such a request fails alone.
        safe = all(0 <= t < self.llm.config.vocab_size and v > -math.inf for t, v in bias.items())
        if not (exact and fits and safe):
            return None
        return Request(list(budget.ids), budget.max_new_tokens, params=c.params,
                       stop_ids=self.llm.tokenizer.stop_ids, min_new_tokens=c.min_new_tokens, seed=c.seed)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def abort_all(self) -> int:
        """Abort every accepted generation (call on the event loop's thread); returns how many."""
        with self._cond:
            tickets = [*self._active, *self._pending]
            self._accepting = False
        for ticket in tickets:
            ticket.abort()
        return len(tickets)

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new work, finish what was accepted, end the thread."""
        with self._cond:
            self._accepting = False
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    # --- the thread --------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._active and not self._pending and not self._stopping:
                    self._cond.wait()
                if self._stopping and not self._active and not self._pending:
                    return
                while self._pending and len(self._active) < self.max_active:
                    self._active.append(self._pending.popleft())
                # Drop what was cancelled while waiting in the queue, too.
                if any(t.cancelled for t in self._pending):
                    self._pending = deque(t for t in self._pending if not t.cancelled)
                turn = list(self._active)
            for ticket in turn:
                if ticket._request is None:
                    continue
                if ticket.cancelled:
                    self._end_batched(ticket, None)
                elif ticket._state is None:
                    self._join(ticket)
            if self.engine is not None and not self.engine.idle:
                self._engine_step()
            for ticket in turn:
                if ticket._request is not None:
                    continue
                try:
                    self._step(ticket)
                except Exception:  # never let one request's bug stop the thread that serves them all
                    log.exception("worker step failed")
                    ticket.cancelled = True
                    self._retire(ticket)
                    ticket._push(_END)

    # --- batched requests --------------------------------------------------------------------------
    def _join(self, ticket: Ticket) -> None:
        try:
            ticket._state = ticket.run.choice_state(0)
            self.engine.submit(ticket._request)
        except Exception as exc:
            log.exception("generation failed")
            self._end_batched(ticket, exc)
            return
        self._batched[ticket._request.id] = ticket

    def _engine_step(self) -> None:
        try:
            events = self.engine.step()
        except Exception as exc:  # one forward pass for every batched request: they fail together
            log.exception("batch engine step failed")
            for ticket in list(self._batched.values()):
                self._end_batched(ticket, exc)
            return
        if events:  # every decoded row reports one event
            with self._cond:
                self._batch_sizes[len(events)] += 1
            self._count(sum(e.token is not None for e in events))
        for event in events:
            ticket = self._batched.get(event.request.id)
            if ticket is None:
                continue
            try:
                self._deliver(ticket, event)
            except Exception as exc:  # a bug in this request's text handling: it fails alone
                log.exception("generation failed")
                self._end_batched(ticket, exc)

    def _deliver(self, ticket: Ticket, event: Event) -> None:
        """Turn one engine event into the ticket's deltas; end the ticket when its choice ends."""
        state = ticket._state
        if event.token is not None:
            delta = state.push(event.token)
            if delta is not None:
                ticket._push(delta)
        if event.finished and state.finish_reason is None:
            ticket._push(state.finish(event.request.finish_reason))  # "eos" | "length"
        if state.finish_reason is not None:  # also a stop string or a loop: the engine drops it
            ticket.run.choices = [state.choice()]
            self._end_batched(ticket, _END)

    def _end_batched(self, ticket: Ticket, last: Any) -> None:
        """Take a ticket out of the engine (its row is freed at once) and the active list; push
        `last` (_END or the exception) unless it was cancelled."""
        self.engine.cancel(ticket._request)  # a no-op once the engine finished it
        self._batched.pop(ticket._request.id, None)
        if last is not None and not ticket.cancelled:
            ticket._push(last)
        self._retire(ticket)

    def _retire(self, ticket: Ticket) -> None:
        with self._cond:
            if ticket in self._active:
                self._active.remove(ticket)

    # --- round-robin requests ----------------------------------------------------------------------
    def _step(self, ticket: Ticket) -> None:
        """Advance one generation by one delta; retire it when it ends, fails or is cancelled."""
        finished = ticket.cancelled
        if not finished:
            try:
                if ticket._iter is None:
                    ticket._iter = iter(ticket.run)
                delta = next(ticket._iter)
            except StopIteration:
                ticket._push(_END)
                finished = True
            except Exception as exc:  # a bug or an engine failure: this request fails, the server lives
                log.exception("generation failed")
                ticket._push(exc)
                finished = True
            else:
                if delta.token_ids:
                    self._count(len(delta.token_ids))
                ticket._push(delta)
        if finished:
            if ticket._iter is not None and ticket.cancelled:
                close = getattr(ticket._iter, "close", None)
                if close is not None:
                    close()
            self._retire(ticket)

    def _count(self, n: int) -> None:
        now = time.monotonic()
        with self._cond:
            self._recent.append((now, n))
            self._prune(now)

    def _prune(self, now: float) -> None:
        """Forget counts older than WINDOW seconds (caller holds the lock)."""
        while self._recent and self._recent[0][0] < now - self.WINDOW:
            self._recent.popleft()
