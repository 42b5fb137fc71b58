"""The OpenAI-compatible HTTP API and the web chat page, as one Starlette application.

    app = create_app(ServeConfig(model="smollm2-135m-instruct", api_key="..."))   # run with uvicorn

Routes: POST /v1/chat/completions, /v1/completions, /v1/embeddings; GET /v1/models[/{id}];
POST /tokenize, /detokenize; GET /health (503 while the model loads), /metrics (Prometheus),
/openapi.json; the page at / and its files under /static/.

Contract:
- Every error, on every route, is the OpenAI envelope {"error": {"message", "type", "param", "code"}}:
  400 for any invalid request (also malformed JSON and prompts over the context, code
  "context_length_exceeded"), 401 without the right key, 404 for an unknown model or route, 413 for a
  body over the cap, 503 + Retry-After while loading or when the queue is full, 500 (logged) for a bug.
  A failure after a stream began is sent as an error event, then `data: [DONE]`.
- Requests are validated and budgeted before anything is queued or streamed.
- With an API key, every route except /health and the page's files needs `Authorization: Bearer KEY`
  (compared in constant time; the key is never logged). CORS is off unless origins are listed.
- Browsers cannot drive it from another site: a Host header that does not name the bound address (or
  an allowed host) is 403 (DNS rebinding), so is an Origin that is neither the server's own nor a
  listed CORS origin, and a POST that is not `application/json` is 415 (no "simple" cross-site POST).
- Message texts never become special tokens (Tokenizer.chat_ids); a raw /v1/completions prompt is the
  caller's own text and does (it may spell `<|im_start|>` on purpose). A request's own
  `chat_template` is refused unless the server trusts them (`trust_request_templates`).
- Model names in requests are compared with the served model's names only; none reaches the
  filesystem. Nothing is ever fetched: a model that is not in the store is an error, not a download.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import hmac
import ipaddress
import logging
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, compile_path
from starlette.types import ASGIApp, Receive, Scope, Send

from llmos import __version__, store
from llmos.errors import ContextLengthError, LlmosError
from llmos.generation import Delta, TokenLogprob, parse_controls
from llmos.json_constraint import JsonFormat, token_texts
from llmos.serve import schema as S
from llmos.serve.metrics import Metrics
from llmos.serve.stream import DONE, EventStream, merged, sse, wait_disconnect
from llmos.serve.worker import Aborted, QueueFull, Ticket, Worker, WorkerError

log = logging.getLogger("llmos.serve")

# OpenAI's neutral sampling values: what a control the model's recommendation does not name gets.
OPENAI_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}
FINISH = {"eos": "stop", "stop": "stop", "repetition": "stop", "length": "length", "abort": "abort"}
STATIC = ("index.html", "app.js", "style.css")
PAGE_HEADERS = {
    "content-security-policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}
RETRY_AFTER = "2"


def sampling_defaults(path: Path, overrides: dict[str, float]) -> dict[str, float]:
    """The sampling a request gets for the controls it does not set, as vLLM's `--generation-config`:
    the model's recommendation (store.recommended_sampling; OpenAI's neutral values for controls it
    does not name), else llmos's free-text defaults, never OpenAI's temperature 1 on a small model
    (which ran away into 1,024 tokens of brackets); the server's flags win."""
    from llmos.api import DEFAULT_SAMPLING

    recommended = store.recommended_sampling(path)
    return {**({**OPENAI_DEFAULTS, **recommended} if recommended else DEFAULT_SAMPLING), **overrides}


@dataclass(frozen=True)
class ServeConfig:
    model: str = store.DEFAULT_CHAT_MODEL
    dtype: str = "auto"
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    max_active: int = 16  # generations interleaved at once
    max_queue: int = 64  # requests waiting beyond those
    max_body_bytes: int = 4 << 20
    default_max_tokens: int = 512  # when a request sets no max_tokens (capped by the context)
    sampling: dict[str, float] | None = None  # for requests that set none; None: sampling_defaults(model, {})
    embed_model: str = store.DEFAULT_EMBED_MODEL
    threads: int | None = None
    host: str = "127.0.0.1"  # the bound address: Host headers must name it (or an allowed host)
    allowed_hosts: tuple[str, ...] = ()  # more names for the Host check; "*" turns the check off
    trust_request_templates: bool = False  # honour a request's chat_template / chat_template_kwargs
    index: str | None = None  # a document index: requests with documents=true are answered from it

    @property
    def served_name(self) -> str:
        """The model's id in the API: its store name, or the file/folder name of a path."""
        looks_like_path = any(c in self.model for c in "/\\") or self.model.lower().endswith(".gguf")
        return Path(self.model).name if looks_like_path or Path(self.model).exists() else self.model


class Server:
    """What the routes share: the model (loaded in the background), the worker, metrics, settings."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.name = config.served_name
        self.names = {self.name, config.model}
        self.status, self.error = "loading", None
        self.llm: Any = None
        self.sampling: dict[str, float] = {}  # for the controls a request does not set; set on load
        self.worker: Worker | None = None
        self.embedder: Any = None
        self._embed_lock = asyncio.Lock()
        self._token_bytes: dict[int, list[int]] = {}
        self.metrics = Metrics()
        self.created = int(time.time())
        self.fingerprint = f"llmos-{__version__}"
        self._key_digest = hashlib.sha256(config.api_key.encode()).digest() if config.api_key else None
        self.loop: asyncio.AbstractEventLoop | None = None  # the app's, once it starts
        # The index's SQLite connection lives on one thread of its own.
        self._index_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmos-index")
        self._index: Any = None

    # --- lifecycle ------------------------------------------------------------------------------
    def start_loading(self) -> threading.Thread:
        thread = threading.Thread(target=self._load, name="llmos-load", daemon=True)
        thread.start()
        return thread

    def _load(self) -> None:
        try:
            import llmos

            if self.config.threads:
                import torch

                torch.set_num_threads(self.config.threads)
            path = store.resolve(self.config.model, pull_missing=False)  # never a download
            self.sampling = self.config.sampling if self.config.sampling is not None else sampling_defaults(path, {})
            llm = llmos.load(path, dtype=self.config.dtype, threads=self.config.threads)  # else picked as the CLI picks
            token_texts(llm.tokenizer)  # built now, not inside the first response_format request
            self.worker = Worker(llm, max_active=self.config.max_active, max_queue=self.config.max_queue)
            self.fingerprint = f"llmos-{__version__}-{llm.dtype}"
            self.llm, self.status = llm, "ok"
            log.info("model %s loaded (%s); serving", self.name, llm.dtype)
        except Exception as exc:
            self.status, self.error = "error", str(exc)
            log.exception("could not load model %s", self.config.model)

    def drain(self, timeout: float) -> None:
        """Shutdown began (SIGTERM): let requests run for `timeout` seconds, then abort what is left
        (each open choice ends with finish_reason "abort"). Safe to call from a signal handler."""
        loop = self.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(loop.call_later, timeout, self._abort_all)

    def _abort_all(self) -> None:
        if self.worker is not None:
            n = self.worker.abort_all()
            if n:
                log.warning("shutdown grace period over: aborted %d request(s)", n)

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.stop()

    # --- checks ---------------------------------------------------------------------------------
    def authorized(self, scope: Scope) -> bool:
        if self._key_digest is None:
            return True
        header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        given = hashlib.sha256(token.strip().encode("utf-8", "surrogateescape")).digest()
        return scheme.lower() == "bearer" and hmac.compare_digest(given, self._key_digest)

    def ready(self) -> Any:
        if self.status == "loading":
            raise S.ApiError(503, "the model is still loading; try again shortly", code="model_loading",
                             headers={"Retry-After": "5"})
        if self.status == "error":
            raise S.ApiError(503, f"the model could not be loaded: {self.error}", code="model_unavailable")
        return self.llm

    def chat_model(self, name: str | None) -> Any:
        """The loaded LLM if `name` is the served model (or omitted)."""
        if name is not None and name not in self.names:
            if name == self.config.embed_model:
                raise S.invalid(f"'{name}' is an embedding model: use /v1/embeddings", "model", "model_not_supported")
            raise S.ApiError(404, f"the model '{name}' does not exist; this server serves '{self.name}'",
                             param="model", code="model_not_found")
        return self.ready()

    def submit(self, ids: list[int], controls: dict[str, Any], param: str) -> Ticket:
        self.ready()
        try:
            return self.worker.submit(ids, controls, self.sampling, default_new=self.config.default_max_tokens)
        except QueueFull as exc:
            raise S.ApiError(503, f"{exc}; retry later", code="server_overloaded",
                             headers={"Retry-After": RETRY_AFTER}) from None
        except LlmosError as exc:
            raise self._controls_error(exc, param) from None

    def validate(self, controls: dict[str, Any], param: str) -> Any:
        try:
            return parse_controls(controls, OPENAI_DEFAULTS)
        except LlmosError as exc:
            raise self._controls_error(exc, param) from None

    @staticmethod
    def _controls_error(exc: LlmosError, param: str) -> S.ApiError:
        """An invalid request from llmos' own validation, in OpenAI's words and parameter names; `param`
        is where this endpoint takes its prompt (messages or prompt)."""
        if isinstance(exc, ContextLengthError):
            n, asked = exc.prompt_tokens, exc.requested
            if asked is None:
                text = (f"This model's maximum context length is {exc.context} tokens. However, your prompt is "
                        f"{n} tokens, which leaves no room for a completion. Please shorten it.")
            else:
                text = (f"This model's maximum context length is {exc.context} tokens. However, you requested "
                        f"{n + asked} tokens ({n} in the prompt, {asked} in the completion). "
                        "Please reduce the length of the prompt or the completion (max_tokens).")
            return S.invalid(text, param, "context_length_exceeded")
        if exc.param == "prompt":
            return S.invalid(str(exc), param)
        names = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "logprobs": "top_logprobs"}
        known = names.get(exc.param or "", exc.param if exc.param in S._Sampling.model_fields else None)
        if (exc.param or "").startswith("response_format"):
            known = exc.param
        return S.invalid(str(exc), known)

    async def get_embedder(self) -> Any:
        async with self._embed_lock:
            if self.embedder is None:
                name = self.config.embed_model
                try:
                    path = store.resolve(name, pull_missing=False)
                except LlmosError as exc:
                    raise S.ApiError(404, f"the embedding model '{name}' is not available: {exc}", param="model",
                                     code="model_not_found") from None
                from llmos.tasks.embed import Embedder

                self.embedder = await asyncio.to_thread(Embedder.load, path)
            return self.embedder

    async def gather(self, question: str) -> Any:
        """Steps 1-4 of grounded QA (`llmos.tasks.qa.gather`) over the server's index, off the event loop."""
        if self.config.index is None:
            raise S.invalid("this server has no document index: start it with `llmos serve --index PATH`", "documents")
        embedder = await self.get_embedder()

        def run() -> Any:
            from llmos.tasks import qa
            from llmos.tasks.index import Index

            if self._index is None:
                self._index = Index(self.config.index, embedder)
            return qa.gather(question, self._index)

        try:
            return await asyncio.get_running_loop().run_in_executor(self._index_thread, run)
        except LlmosError as exc:
            raise S.invalid(str(exc), "messages") from None

    def token_bytes(self, token: int, text: str) -> list[int]:
        """The raw bytes of a token: as its piece spells them (byte-level or byte-fallback pieces),
        else the UTF-8 of its text."""
        out = self._token_bytes.get(token)
        if out is None:
            raw = self.llm.tokenizer.token_bytes(token)
            out = self._token_bytes[token] = list(raw if raw is not None else text.encode("utf-8"))
        return out


def _server(request: Request) -> Server:
    return request.app.state.server


async def read_json(request: Request) -> Any:
    cap = _server(request).config.max_body_bytes
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > cap:
            raise _too_large(cap)
    return S.decode_body(bytes(body))


def _too_large(cap: int) -> S.ApiError:
    return S.ApiError(413, f"the request body is larger than this server's limit of {cap} bytes",
                      code="request_too_large")


# --- generation results -------------------------------------------------------------------------------------


class _Choice:
    """One choice's output gathered from its deltas."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.tokens = 0
        self.logprobs: list[TokenLogprob] = []
        self.finish: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)


class _Run:
    """The deltas of one request's tickets, numbered as OpenAI choices (prompt k, sample i -> k*n+i)."""

    def __init__(self, server: Server, tickets: Sequence[Ticket], n: int, started: float) -> None:
        self.server, self.tickets, self.n, self.started = server, list(tickets), n, started
        self.choices = [_Choice() for _ in range(len(tickets) * n)]
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
            raise _generation_failed(exc) from None
        return True


def _chat_logprobs(server: Server, lps: Sequence[TokenLogprob]) -> dict[str, Any]:
    def entry(token: str, token_id: int, lp: float) -> dict[str, Any]:
        return {"token": token, "logprob": _finite(lp), "bytes": server.token_bytes(token_id, token)}

    return {"content": [{**entry(t.token, t.id, t.logprob), "top_logprobs": [entry(*top) for top in t.top]}
                        for t in lps], "refusal": None}


def _completion_logprobs(lps: Sequence[TokenLogprob], offset: int) -> dict[str, Any]:
    offsets = []
    for t in lps:
        offsets.append(offset)
        offset += len(t.token)
    return {"tokens": [t.token for t in lps], "token_logprobs": [_finite(t.logprob) for t in lps],
            "top_logprobs": [{text: _finite(lp) for text, _, lp in t.top} for t in lps], "text_offset": offsets}


def _finite(x: float) -> float:
    return max(float(x), -9999.0)  # -inf is not JSON; OpenAI reports impossible tokens as -9999


# --- routes ---------------------------------------------------------------------------------------------------


async def chat_completions(request: Request) -> Any:
    started = time.perf_counter()
    server = _server(request)
    req: S.ChatCompletionRequest = S.parse(S.ChatCompletionRequest, await read_json(request))
    llm = server.chat_model(req.model)
    if req.documents:
        return await _answer_from_documents(request, server, req, llm, started)
    try:
        ids = llm.chat_ids([m.turn() for m in req.messages], **_request_template(server, req))
    except LlmosError as exc:
        raise S.invalid(str(exc), "messages") from None
    _check_stops(llm, req)
    controls = req.controls(llm.config.vocab_size)
    ticket = server.submit(ids, controls, "messages")
    schema = ticket.run.controls.response_format
    run = _Run(server, [ticket], req.n, started)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if req.stream:
        return _event_stream(run, _envelope(server, rid, "chat.completion.chunk", created), req.include_usage,
                             _chat_chunks(server, run, schema))
    if not await run.collect(request):
        return Response(status_code=499)
    choices = []
    for i, c in enumerate(run.choices):
        _check_json(schema, c)
        choices.append({"index": i, "message": {"role": "assistant", "content": c.text, "refusal": None},
                        "logprobs": _chat_logprobs(server, c.logprobs) if req.logprobs else None,
                        "finish_reason": c.finish or "stop"})
    return JSONResponse({**_envelope(server, rid, "chat.completion", created), "choices": choices,
                         "usage": run.usage()})


async def _answer_from_documents(request: Request, server: Server, req: S.ChatCompletionRequest, llm: Any,
                                 started: float) -> Any:
    """documents=true: the last user message answered by the grounded QA pipeline over the server's
    index; the reply carries `sources` (quoted sentences with file:line) and `found` beside the usual
    fields. The model writes through the worker like any request; the pipeline checks and cites."""
    from llmos.tasks import qa

    question = next((m.text() for m in reversed(req.messages) if m.role == "user"), "")
    if not question.strip():
        raise S.invalid("documents=true needs a user message with a question", "messages")
    found = await server.gather(question)
    run = None
    if found.declined is not None:
        answer = found.declined
    else:
        controls = {**qa.ANSWER_CONTROLS, "max_new_tokens": req.max_tokens or qa.DEFAULT_MAX_NEW_TOKENS}
        run = _Run(server, [server.submit(llm.chat_ids(found.messages()), controls, "messages")], 1, started)
        if not await run.collect(request):
            return Response(status_code=499)
        done = run.tickets[0].run.choices
        answer = found.conclude(run.choices[0].text, done[0].finish_reason if done else run.choices[0].finish)
    shown = answer.cited if answer.found else answer.nearest
    extra = {"sources": [s.as_dict() for s in shown], "found": answer.found}
    usage = run.usage() if run else {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if req.stream:
        base = _envelope(server, rid, "chat.completion.chunk", created)

        async def events() -> AsyncIterator[str]:
            yield sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": str(answer)},
                                            "logprobs": None, "finish_reason": None}]})
            yield sse({**base, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}], **extra})
            if req.include_usage:
                yield sse({**base, "choices": [], "usage": usage})
            yield DONE

        return EventStream(events(), run.tickets if run else [])
    message = {"role": "assistant", "content": str(answer), "refusal": None}
    return JSONResponse({**_envelope(server, rid, "chat.completion", created),
                         "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}],
                         "usage": usage, **extra})


def _request_template(server: Server, req: S.ChatCompletionRequest) -> dict[str, Any]:
    """The request's own chat template and variables, when this server trusts them (else refused)."""
    if req.chat_template is None and req.chat_template_kwargs is None:
        return {}
    param = "chat_template" if req.chat_template is not None else "chat_template_kwargs"
    if not server.config.trust_request_templates:
        raise S.invalid(f"{param} is refused: this server renders conversations with its model's own chat template "
                        "(start it with --trust-request-chat-template to let requests choose)", param)
    return {"template": req.chat_template, "variables": req.chat_template_kwargs}


def _check_stops(llm: Any, req: S._Sampling) -> None:
    """Refuse a stop string longer than the context: no completion could ever contain it."""
    context = llm.config.max_seq_len
    for s in req._stops():
        # Its tokens are at most its UTF-8 bytes (4 a character): encode only where that could exceed the context.
        if 4 * len(s) > context and len(llm.encode(s, add_special_tokens=False)) > context:
            raise S.invalid(f"a stop string of {len(s)} characters is longer than the model's context of {context} "
                            "tokens, so it could never match; shorten it", "stop")


def _check_json(fmt: JsonFormat | None, choice: _Choice) -> None:
    if fmt is not None and choice.finish == "stop":
        problem = fmt.problem(choice.text)
        if problem:
            log.warning("constrained JSON output does not match the requested format: %s", problem)


def _envelope(server: Server, rid: str, kind: str, created: int) -> dict[str, Any]:
    """The fields every completion response and stream chunk starts with."""
    return {"id": rid, "object": kind, "created": created, "model": server.name,
            "system_fingerprint": server.fingerprint}


def _generation_failed(exc: WorkerError) -> S.ApiError:
    return S.ApiError(500, f"generation failed: {exc}", code="internal_error")


def _event_stream(run: _Run, base: dict[str, Any], usage: bool, choices: AsyncIterator[dict[str, Any]]) -> EventStream:
    """The SSE response of a streamed request: a chunk per choice update from `choices`, then the usage
    chunk (when asked for) and [DONE]; a failure after the stream began is an error event, then [DONE]."""
    extra = {"usage": None} if usage else {}

    async def events() -> AsyncIterator[str]:
        try:
            async with contextlib.aclosing(choices):
                async for choice in choices:
                    yield sse({**base, "choices": [choice], **extra})
        except WorkerError as exc:
            yield sse(_generation_failed(exc).body())
        else:
            if usage:
                yield sse({**base, "choices": [], "usage": run.usage()})
        yield DONE

    return EventStream(events(), run.tickets)


async def _chat_chunks(server: Server, run: _Run, schema: JsonFormat | None) -> AsyncIterator[dict[str, Any]]:
    def choice(index: int, delta: dict[str, Any], logprobs: Any = None, finish: str | None = None) -> dict[str, Any]:
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

    for i in range(len(run.choices)):
        yield choice(i, {"role": "assistant", "content": ""})
    want_lp = run.tickets[0].run.controls.logprobs is not None
    async for index, delta in run.deltas():
        if delta.text or delta.logprobs:
            yield choice(index, {"content": delta.text}, _chat_logprobs(server, delta.logprobs) if want_lp else None)
        if delta.finish_reason:
            _check_json(schema, run.choices[index])
            yield choice(index, {}, None, run.choices[index].finish)


async def completions(request: Request) -> Any:
    started = time.perf_counter()
    server = _server(request)
    req: S.CompletionRequest = S.parse(S.CompletionRequest, await read_json(request))
    llm = server.chat_model(req.model)
    _check_stops(llm, req)
    prompts = req.prompts()
    id_lists, texts = [], []
    for k, p in enumerate(prompts):
        if isinstance(p, str):
            id_lists.append(llm.encode(p))
            texts.append(p)
        else:
            _check_ids(p, llm.config.vocab_size, "prompt", "prompt token ids")
            id_lists.append(list(p))
            texts.append(llm.decode(p) if req.echo else "")
    controls = req.controls(llm.config.vocab_size)
    tickets: list[Ticket] = []
    try:
        for ids in id_lists:
            tickets.append(server.submit(ids, controls, "prompt"))
    except S.ApiError:
        for t in tickets:
            t.cancel()
        raise
    run = _Run(server, tickets, req.n, started)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    echo = [texts[i // req.n] if req.echo else "" for i in range(len(run.choices))]
    if req.stream:
        return _event_stream(run, _envelope(server, rid, "text_completion", created), req.include_usage,
                             _completion_chunks(run, echo, req.logprobs is not None))
    if not await run.collect(request):
        return Response(status_code=499)
    choices = [{"index": i, "text": echo[i] + c.text,
                "logprobs": _completion_logprobs(c.logprobs, len(echo[i])) if req.logprobs is not None else None,
                "finish_reason": c.finish or "stop"} for i, c in enumerate(run.choices)]
    return JSONResponse({**_envelope(server, rid, "text_completion", created), "choices": choices,
                         "usage": run.usage()})


async def _completion_chunks(run: _Run, echo: list[str], want_lp: bool) -> AsyncIterator[dict[str, Any]]:
    offsets = [len(e) for e in echo]

    def choice(index: int, text: str, logprobs: Any = None, finish: str | None = None) -> dict[str, Any]:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    for i, e in enumerate(echo):
        if e:
            yield choice(i, e)
    async for index, delta in run.deltas():
        if delta.text or delta.logprobs:
            lp = _completion_logprobs(delta.logprobs, offsets[index]) if want_lp else None
            offsets[index] += sum(len(t.token) for t in delta.logprobs)
            yield choice(index, delta.text, lp)
        if delta.finish_reason:
            yield choice(index, "", None, run.choices[index].finish)


def _check_ids(ids: Sequence[int], vocab_size: int, param: str, what: str = "token ids") -> None:
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise S.invalid(f"{what} must be in [0, {vocab_size - 1}], got {bad[:5]}", param)


async def embeddings(request: Request) -> Any:
    server = _server(request)
    req: S.EmbeddingRequest = S.parse(S.EmbeddingRequest, await read_json(request))
    name = server.config.embed_model
    if req.model is not None and req.model != name:
        if req.model in server.names:
            raise S.invalid(f"'{req.model}' is a chat model; the embedding model is '{name}'", "model",
                            "model_not_supported")
        raise S.ApiError(404, f"the model '{req.model}' does not exist; the embedding model is '{name}'",
                         param="model", code="model_not_found")
    texts = req.texts()
    embedder = await server.get_embedder()
    if req.dimensions is not None and req.dimensions != embedder.dim:
        raise S.invalid(f"dimensions must be {embedder.dim} for {name} (it cannot shorten its vectors)", "dimensions")
    async with server._embed_lock:  # one batch at a time beside the generation thread
        out = await asyncio.to_thread(embedder.embed, texts)
    data = []
    for i, vector in enumerate(out.vectors):
        value: Any = (base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
                      if req.encoding_format == "base64" else [float(x) for x in vector])
        data.append({"object": "embedding", "index": i, "embedding": value})
    tokens = sum(min(n, embedder.max_tokens) for n in out.n_tokens)
    server.metrics.tokens(tokens, 0)
    return JSONResponse({"object": "list", "data": data, "model": name,
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def _model_card(server: Server, name: str, capabilities: list[str]) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": server.created, "owned_by": "llmos", "capabilities": capabilities}


def _models(server: Server) -> list[dict[str, Any]]:
    return [_model_card(server, server.name, ["chat", "completions"]),
            _model_card(server, server.config.embed_model, ["embeddings"])]


async def list_models(request: Request) -> Any:
    return JSONResponse({"object": "list", "data": _models(_server(request))})


async def get_model(request: Request) -> Any:
    server = _server(request)
    name = request.path_params["model"]
    for card in _models(server):
        if card["id"] == name or (name in server.names and "chat" in card["capabilities"]):
            return JSONResponse(card)
    raise S.ApiError(404, f"the model '{name}' does not exist", param="model", code="model_not_found")


async def tokenize(request: Request) -> Any:
    server = _server(request)
    req: S.TokenizeRequest = S.parse(S.TokenizeRequest, await read_json(request))
    llm = server.chat_model(req.model)
    if (req.prompt is None) == (req.messages is None):
        raise S.invalid("give exactly one of prompt or messages", "prompt")
    try:
        if req.messages is not None:
            ids = llm.chat_ids([m.turn() for m in req.messages], add_generation_prompt=req.add_generation_prompt)
        else:
            ids = llm.encode(req.prompt, add_special_tokens=req.add_special_tokens)
    except LlmosError as exc:
        raise S.invalid(str(exc), "messages" if req.messages is not None else "prompt") from None
    return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": llm.config.max_seq_len})


async def detokenize(request: Request) -> Any:
    server = _server(request)
    req: S.DetokenizeRequest = S.parse(S.DetokenizeRequest, await read_json(request))
    llm = server.chat_model(req.model)
    _check_ids(req.tokens, llm.config.vocab_size, "tokens")
    return JSONResponse({"prompt": llm.decode(req.tokens, skip_special_tokens=False)})


async def health(request: Request) -> Any:
    server = _server(request)
    w = server.worker
    body = {"status": server.status, "model": server.name, "active": w.active if w else 0,
            "queue_depth": w.queue_depth if w else 0, "documents": server.config.index is not None}
    if server.error:
        body["error"] = server.error
    return JSONResponse(body, status_code=200 if server.status == "ok" else 503)


async def metrics(request: Request) -> Any:
    server = _server(request)
    w = server.worker
    text = server.metrics.render(queue_depth=w.queue_depth if w else 0, active=w.active if w else 0,
                                 tokens_per_second=w.tokens_per_second() if w else 0.0, loaded=server.status == "ok",
                                 batch_sizes=w.batch_sizes() if w else None)
    return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")


async def page(request: Request) -> Any:
    name = request.path_params.get("name", "index.html")
    if name not in STATIC:
        raise HTTPException(404)
    body, kind = _static_file(name)
    return Response(body, media_type=kind, headers=PAGE_HEADERS)


@functools.cache
def _static_file(name: str) -> tuple[bytes, str]:
    """A page file's bytes and media type (read once: they ship with the package)."""
    kind = {"html": "text/html", "js": "text/javascript", "css": "text/css"}[name.rsplit(".", 1)[1]]
    return resources.files("llmos.serve").joinpath("static", name).read_bytes(), f"{kind}; charset=utf-8"


# --- OpenAPI --------------------------------------------------------------------------------------------------

async def openapi(request: Request) -> Any:
    return JSONResponse(request.app.state.openapi)


@dataclass(frozen=True)
class Endpoint:
    """One route, in the one table everything reads: what Starlette dispatches, what /openapi.json
    documents (when `summary` is set), the label /metrics counts its requests under, and whether it
    is open without the API key."""

    method: str
    path: str  # a Starlette path template
    handler: Callable[[Request], Awaitable[Any]]
    summary: str | None = None
    request: type | None = None
    response: type | None = None  # JSON body of a 200; None: not JSON (or not documented)
    public: bool = False
    streams: bool = False  # with "stream": true, the 200 is server-sent events instead

    @property
    def label(self) -> str:
        """The path as OpenAPI and the metrics write it: "/v1/models/{model:path}" -> "/v1/models/{model}"."""
        return re.sub(r"\{(\w+):\w+\}", r"{\1}", self.path)


ENDPOINTS = (
    Endpoint("POST", "/v1/chat/completions", chat_completions, "Chat completion (stream=true for server-sent events)",
             S.ChatCompletionRequest, S.ChatCompletion, streams=True),
    Endpoint("POST", "/v1/completions", completions, "Text completion", S.CompletionRequest, S.Completion,
             streams=True),
    Endpoint("POST", "/v1/embeddings", embeddings, "Sentence embeddings", S.EmbeddingRequest, S.EmbeddingList),
    Endpoint("GET", "/v1/models", list_models, "The served models", None, S.ModelList),
    Endpoint("GET", "/v1/models/{model:path}", get_model, "One model", None, S.Model),
    Endpoint("POST", "/tokenize", tokenize, "Text or messages to token ids", S.TokenizeRequest, S.Tokens),
    Endpoint("POST", "/detokenize", detokenize, "Token ids to text", S.DetokenizeRequest, S.Detokenized),
    Endpoint("GET", "/health", health, "200 when serving, 503 while the model loads", None, S.Health, public=True),
    Endpoint("GET", "/metrics", metrics, "Prometheus metrics (text/plain)"),
    Endpoint("GET", "/openapi.json", openapi),
    Endpoint("GET", "/", page, public=True),
    Endpoint("GET", "/index.html", page, public=True),
    Endpoint("GET", "/static/{name}", page, public=True),
)
_MATCHERS = tuple((compile_path(e.path)[0], e) for e in ENDPOINTS)


def endpoint_of(path: str) -> Endpoint | None:
    """The endpoint a request path belongs to, whatever its method (None: no route)."""
    return next((e for regex, e in _MATCHERS if regex.match(path)), None)


def openapi_document() -> dict[str, Any]:
    from pydantic.json_schema import models_json_schema

    documented = [e for e in ENDPOINTS if e.summary is not None]
    models = {m for e in documented for m in (e.request, e.response) if m is not None} | {S.Error}
    _, defs = models_json_schema([(m, "validation") for m in sorted(models, key=lambda m: m.__name__)],
                                 ref_template="#/components/schemas/{model}")
    error = {"description": "OpenAI error envelope",
             "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    paths: dict[str, Any] = {}
    for e in documented:
        ok = {"description": "OK", **(_json_body(e.response) if e.response is not None else {})}
        if e.streams:
            # each event: data is a chunk's JSON (the response model's shape, `delta` for `message`), then [DONE]
            ok["content"]["text/event-stream"] = {"schema": {"type": "object", "required": ["data"],
                                                             "properties": {"data": {"type": "string"}}}}
        op: dict[str, Any] = {"summary": e.summary, "responses": {"200": ok, "default": error}}
        if e.request is not None:
            op["requestBody"] = {"required": True, **_json_body(e.request)}
        names = re.findall(r"\{(\w+)\}", e.label)
        if names:
            op["parameters"] = [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}} for n in names]
        if not e.public:
            op["security"] = [{"bearer": []}]
        paths.setdefault(e.label, {})[e.method.lower()] = op
    return {"openapi": "3.1.0", "info": {"title": "llmos", "version": __version__,
                                         "description": "OpenAI-compatible API of a local llmos server"},
            "paths": paths, "components": {"schemas": defs.get("$defs", {}),
                                           "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}}}


def _json_body(model: type) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}


# --- errors, auth, metrics --------------------------------------------------------------------------------------


def _error_response(err: S.ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


async def _api_error(request: Request, exc: Exception) -> Response:
    return _error_response(exc)  # type: ignore[arg-type]


async def _http_error(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 500)
    message = {404: f"no route {request.method} {request.url.path}", 405: f"method {request.method} is not allowed here"}
    return _error_response(S.ApiError(status, message.get(status, str(getattr(exc, "detail", exc))),
                                      code={404: "not_found", 405: "method_not_allowed"}.get(status)))


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    return _error_response(S.ApiError(500, "internal server error (logged on the server)", code="internal_error"))


class Guard:
    """Outermost app logic: API key, body size cap (by Content-Length), request metrics by route."""

    def __init__(self, app: ASGIApp, server: Server) -> None:
        self.app, self.server = app, server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = endpoint_of(path)
        route = endpoint.label if endpoint is not None else "other"
        status = [500]

        async def record(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            error = self._refuse(scope, endpoint)
            if error is not None:
                await _error_response(error)(scope, receive, record)
                return
            await self.app(scope, receive, record)
        finally:
            self.server.metrics.request(route, status[0])

    def _refuse(self, scope: Scope, endpoint: Endpoint | None) -> S.ApiError | None:
        headers = dict(scope.get("headers") or [])
        config = self.server.config
        host = headers.get(b"host", b"").decode("latin-1")
        if host and not host_allowed(host, config.host, config.allowed_hosts):
            return S.ApiError(403, f"the Host header {host!r} does not name this server; use its address "
                              f"(http://{_netloc(config.host)}/) or start it with --allowed-host NAME",
                              param="host", code="host_not_allowed")
        origin = headers.get(b"origin")
        if origin is not None and not origin_allowed(origin.decode("latin-1"), host, config.cors_origins):
            return S.ApiError(403, f"requests from the web origin {origin.decode('latin-1')!r} are not allowed; "
                              "start the server with --cors-origin ORIGIN to allow it", param="origin",
                              code="origin_not_allowed")
        if not (endpoint is not None and endpoint.public) and not self.server.authorized(scope):
            return S.ApiError(401, "missing or incorrect API key: send the header 'Authorization: Bearer <key>'",
                              code="invalid_api_key")
        if scope["method"] == "POST" and endpoint is not None and endpoint.method == "POST":
            kind = headers.get(b"content-type", b"").decode("latin-1").partition(";")[0].strip().lower()
            if kind != "application/json":
                return S.ApiError(415, f"the request body must be JSON, sent with 'Content-Type: application/json' "
                                  f"(got {kind or 'no content type'!r})", param="content-type",
                                  code="unsupported_media_type")
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.server.config.max_body_bytes
            except ValueError:
                return S.invalid("invalid Content-Length header")
            if too_big:
                return _too_large(self.server.config.max_body_bytes)
        return None


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARDS = ("", "0.0.0.0", "::")


def host_allowed(host: str, bound: str, allowed: Sequence[str] = ()) -> bool:
    """Whether a Host header names this server: the bound address, a loopback name, an `allowed`
    name, or (bound to every interface) any IP address. A DNS-rebinding page reaches the server under
    its own domain name, which is none of these."""
    if "*" in allowed:
        return True
    name = host.strip().lower()
    if name.startswith("["):  # [::1]:8000
        name = name[1:].partition("]")[0]
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    name = name.rstrip(".")
    bound = bound.strip("[]").lower()
    if name in LOOPBACK_NAMES or name == bound or name in (a.lower() for a in allowed):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return bound in WILDCARDS


def origin_allowed(origin: str, host: str, cors_origins: Sequence[str]) -> bool:
    """A browser's Origin is the server's own page (same host and port as the Host header) or listed."""
    if origin in cors_origins or "*" in cors_origins:
        return True
    scheme, sep, netloc = origin.partition("://")
    return bool(sep) and scheme in ("http", "https") and netloc.lower() == host.strip().lower()


def _netloc(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def create_app(config: ServeConfig, *, load: bool = True) -> Starlette:
    """The ASGI app; the model loads in a background thread once the app starts (load=False skips it)."""
    server = Server(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        server.loop = asyncio.get_running_loop()
        if load:
            server.start_loading()
        yield
        await asyncio.to_thread(server.shutdown)  # in-flight requests have finished: uvicorn waited for them

    routes = [Route(e.path, e.handler, methods=[e.method]) for e in ENDPOINTS]
    middleware = [Middleware(Guard, server=server)]
    if config.cors_origins:  # outside the guard: preflight requests carry no key
        middleware.insert(0, Middleware(CORSMiddleware, allow_origins=list(config.cors_origins),
                                        allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"]))
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan, exception_handlers={
        S.ApiError: _api_error, HTTPException: _http_error, Exception: _internal_error})
    app.state.server = server
    app.state.openapi = openapi_document()
    return app
