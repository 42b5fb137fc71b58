"""The request path's engine room: one background thread owns the model and runs every generation.

Routes validate a request and `submit` it; they get a `Ticket`, an async iterator of `Delta`s. The
worker thread interleaves the active generations step by step (round-robin: each active
`TextGeneration` advances by one delta in turn), so several clients stream at once, and pushes each
delta into its ticket's asyncio queue with `loop.call_soon_threadsafe`.

Contract:
- `submit` validates on the caller's thread (`LLM.start` raises `LlmosError` before anything is
  queued), so a bad request fails before any response starts.
- At most `max_active` generations run at once; up to `max_queue` more wait. Past that, `submit`
  raises `QueueFull` (the route answers 503 with Retry-After).
- `Ticket.cancel()` (a client went away) takes effect at the worker's next step: the generation is
  closed and its slot freed.
- `stop()` refuses new work, lets what is queued and running finish, then ends the thread.

A batched engine can replace the loop inside `_run` (advance all active requests in one forward
pass) without changing this interface, so no route changes with it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

from llmos.api import LLM
from llmos.generation import Delta, TextGeneration

log = logging.getLogger("llmos.serve")

_END = object()


class QueueFull(Exception):
    """The server has as many requests as it accepts; try again later."""


class WorkerError(Exception):
    """A generation failed inside the worker (after the request was accepted)."""


class Ticket:
    """One submitted generation: `async for delta in ticket`, or `cancel()` it.

    `prompt_tokens` and `max_new_tokens` are the budget the request was accepted with.
    """

    def __init__(self, run: TextGeneration, loop: asyncio.AbstractEventLoop) -> None:
        self.run = run
        self.prompt_tokens = len(run.budget.ids)
        self.max_new_tokens = run.budget.max_new_tokens
        self.n = run.controls.n
        self.cancelled = False
        self._loop = loop
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._iter: Iterator[Delta] | None = None
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
        if isinstance(item, BaseException):
            self._done = True
            raise WorkerError(str(item) or type(item).__name__) from item
        return item

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

    def __init__(self, llm: LLM, *, max_active: int = 16, max_queue: int = 64) -> None:
        if max_active < 1 or max_queue < 0:
            raise ValueError(f"max_active must be >= 1 and max_queue >= 0, got {max_active}, {max_queue}")
        self.llm, self.max_active, self.max_queue = llm, max_active, max_queue
        self._pending: deque[Ticket] = deque()
        self._active: list[Ticket] = []
        self._cond = threading.Condition()
        self._accepting = True
        self._stopping = False
        self.tokens_generated = 0  # completion tokens produced, all requests
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

    def tokens_per_second(self) -> float:
        """Completion tokens per second over the last WINDOW seconds, all requests together."""
        now = time.monotonic()
        with self._cond:
            while self._recent and self._recent[0][0] < now - self.WINDOW:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / self.WINDOW

    def submit(self, ids: list[int], controls: dict[str, Any], defaults: dict[str, Any] | None = None,
               *, default_new: int = 256) -> Ticket:
        """Validate and enqueue a generation; must be called from the event loop's thread.

        Raises LlmosError (invalid controls, prompt over the context) or QueueFull."""
        run = self.llm.start(ids, controls, defaults=defaults, default_new=default_new)
        ticket = Ticket(run, asyncio.get_running_loop())
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

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

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
                for t in [t for t in self._pending if t.cancelled]:
                    self._pending.remove(t)
                turn = list(self._active)
            for ticket in turn:
                try:
                    self._step(ticket)
                except Exception:  # never let one request's bug stop the thread that serves them all
                    log.exception("worker step failed")
                    ticket.cancelled = True
                    with self._cond:
                        if ticket in self._active:
                            self._active.remove(ticket)
                    ticket._push(_END)

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
            with self._cond:
                if ticket in self._active:
                    self._active.remove(ticket)

    def _count(self, n: int) -> None:
        self.tokens_generated += n
        now = time.monotonic()
        with self._cond:
            self._recent.append((now, n))
            while self._recent[0][0] < now - self.WINDOW:
                self._recent.popleft()
