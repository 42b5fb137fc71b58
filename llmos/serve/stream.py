"""Streaming plumbing: Server-Sent Events responses that notice a client leaving, and ticket merging.

`EventStream` is an ASGI response that sends `data: ...` events as an async iterator produces them,
while a second task listens for the client's disconnect: the moment it comes, the request's tickets
are cancelled, so the worker frees the slot at its next step (not when the next token happens to be
written to a dead socket). `wait_disconnect` does the same for a non-streamed request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

from starlette.types import Receive, Scope, Send

from llmos.generation import Delta
from llmos.serve.worker import Ticket

DONE = "data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def wait_disconnect(receive: Receive) -> None:
    """Return when the client has gone (the request body must already be read)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def merged(tickets: Sequence[Ticket]) -> AsyncIterator[tuple[int, Delta]]:
    """(ticket number, delta) from several tickets as they arrive; a WorkerError propagates."""
    if len(tickets) == 1:
        async for delta in tickets[0]:
            yield 0, delta
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(k: int, ticket: Ticket) -> None:
        try:
            async for delta in ticket:
                await queue.put((k, delta))
        except Exception as exc:  # handed to the consumer
            await queue.put((k, exc))
        finally:
            await queue.put((k, None))

    tasks = [asyncio.create_task(pump(k, t)) for k, t in enumerate(tickets)]
    try:
        left = len(tasks)
        while left:
            k, item = await queue.get()
            if item is None:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield k, item
    finally:
        for task in tasks:
            task.cancel()


class EventStream:
    """An SSE response over `events`; cancels `tickets` when the client disconnects or it ends."""

    HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]

    def __init__(self, events: AsyncIterator[str], tickets: Sequence[Ticket]) -> None:
        self.events, self.tickets = events, list(tickets)
        self.gone = False

    async def _watch(self, receive: Receive) -> None:
        await wait_disconnect(receive)
        self.gone = True
        for ticket in self.tickets:
            ticket.cancel()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": list(self.HEADERS)})  # middleware may add
        watch = asyncio.create_task(self._watch(receive))
        try:
            async for event in self.events:
                if self.gone:
                    break
                await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
            if not self.gone:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the connection broke while writing
            pass
        finally:
            watch.cancel()
            for ticket in self.tickets:
                ticket.cancel()
            with contextlib.suppress(Exception):
                await self.events.aclose()
