"""Response building: a request's deltas gathered per OpenAI choice (`Run`), usage, logprobs in the
chat and text-completion shapes, the envelope every response starts with, and the SSE stream of a
streamed request."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from starlette.requests import Request

from llmos.generation import Delta, TokenLogprob
from llmos.serve import schema as S
from llmos.serve.server import Server
from llmos.serve.stream import DONE, EventStream, merged, sse, wait_disconnect
from llmos.serve.worker import Aborted, Ticket, WorkerError


FINISH = {"eos": "stop", "stop": "stop", "repetition": "stop", "length": "length", "abort": "abort"}


class RunChoice:
    """One choice's output gathered from its deltas."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.tokens = 0
        self.logprobs: list[TokenLogprob] = []
        self.finish: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)


class Run:
    """The deltas of one request's tickets, numbered as OpenAI choices (prompt k, sample i -> k*n+i)."""

    def __init__(self, server: Server, tickets: Sequence[Ticket], n: int, started: float) -> None:
        self.server, self.tickets, self.n, self.started = server, list(tickets), n, started
        self.choices = [RunChoice() for _ in range(len(tickets) * n)]
        self.first = False

    @property
    def prompt_tokens(self) -> int:
        return sum(t.prompt_tokens for t in self.tickets)

    @property
    def completion_tokens(self) -> int:
        # A finished run's choices hold every token; deltas skip tokens that added no text yet.
        total = 0
        for k, ticket in enumerate(self.tickets):
            done = ticket.run.choices
            total += (sum(len(c.token_ids) for c in done) if done
                      else sum(c.tokens for c in self.choices[k * self.n:(k + 1) * self.n]))
        return total

    def usage(self) -> dict[str, int]:
        p, c = self.prompt_tokens, self.completion_tokens
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    async def deltas(self) -> AsyncIterator[tuple[int, Delta]]:
        try:
            async for k, delta in merged(self.tickets):
                index = k * self.n + delta.index
                choice = self.choices[index]
                if delta.token_ids and not self.first:
                    self.first = True
                    self.server.metrics.first_token(time.perf_counter() - self.started)
                choice.tokens += len(delta.token_ids)
                choice.parts.append(delta.text)
                choice.logprobs.extend(delta.logprobs)
                if delta.finish_reason:
                    choice.finish = FINISH.get(delta.finish_reason, "stop")
                yield index, delta
        except Aborted:  # the shutdown grace period ran out: every open choice ends here
            for index, choice in enumerate(self.choices):
                if choice.finish is None:
                    choice.finish = "abort"
                    yield index, Delta(index % self.n, "", finish_reason="abort")
        finally:
            self.server.metrics.tokens(self.prompt_tokens, self.completion_tokens)

    async def collect(self, request: Request) -> bool:
        """Run to the end; False when the client went away first (its tickets are then cancelled)."""

        async def drain() -> None:
            async for _ in self.deltas():
                pass

        task = asyncio.create_task(drain())
        watch = asyncio.create_task(wait_disconnect(request.receive))
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        watch.cancel()
        if task not in done:
            for ticket in self.tickets:
                ticket.cancel()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            return False
        try:
            task.result()
        except WorkerError as exc:
            raise generation_failed(exc) from None
        return True


def chat_logprobs(server: Server, lps: Sequence[TokenLogprob]) -> dict[str, Any]:
    def entry(token: str, token_id: int, lp: float) -> dict[str, Any]:
        return {"token": token, "logprob": _finite(lp), "bytes": server.token_bytes(token_id, token)}

    return {"content": [{**entry(t.token, t.id, t.logprob), "top_logprobs": [entry(*top) for top in t.top]}
                        for t in lps], "refusal": None}


def completion_logprobs(lps: Sequence[TokenLogprob], offset: int) -> dict[str, Any]:
    offsets = []
    for t in lps:
        offsets.append(offset)
        offset += len(t.token)
    return {"tokens": [t.token for t in lps], "token_logprobs": [_finite(t.logprob) for t in lps],
            "top_logprobs": [{text: _finite(lp) for text, _, lp in t.top} for t in lps], "text_offset": offsets}


def _finite(x: float) -> float:
    return max(float(x), -9999.0)  # -inf is not JSON; OpenAI reports impossible tokens as -9999


def envelope(server: Server, rid: str, kind: str, created: int) -> dict[str, Any]:
    """The fields every completion response and stream chunk starts with."""
    return {"id": rid, "object": kind, "created": created, "model": server.name,
            "system_fingerprint": server.fingerprint}


def generation_failed(exc: WorkerError) -> S.ApiError:
    return S.ApiError(500, f"generation failed: {exc}", code="internal_error")


def event_stream(run: Run, base: dict[str, Any], usage: bool, choices: AsyncIterator[dict[str, Any]]) -> EventStream:
    """The SSE response of a streamed request: a chunk per choice update from `choices`, then the usage
    chunk (when asked for) and [DONE]; a failure after the stream began is an error event, then [DONE]."""
    extra = {"usage": None} if usage else {}

    async def events() -> AsyncIterator[str]:
        try:
            async with contextlib.aclosing(choices):
                async for choice in choices:
                    yield sse({**base, "choices": [choice], **extra})
        except WorkerError as exc:
            yield sse(generation_failed(exc).body())
        else:
            if usage:
                yield sse({**base, "choices": [], "usage": run.usage()})
        yield DONE

    return EventStream(events(), run.tickets)
