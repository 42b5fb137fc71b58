"""The route handlers: chat and text completions, embeddings, models, tokenize/detokenize, health,
metrics and the chat page. Each validates its request fully before anything is queued or streamed."""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from importlib import resources
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from llmos.errors import LlmosError
from llmos.json_constraint import JsonFormat
from llmos.serve import schema as S
from llmos.serve.results import Run, RunChoice, chat_logprobs, completion_logprobs, envelope, event_stream
from llmos.serve.server import Server, read_json, server_of
from llmos.serve.stream import DONE, EventStream, sse
from llmos.serve.worker import Ticket

log = logging.getLogger("llmos.serve")


STATIC = ("index.html", "app.js", "style.css")
PAGE_HEADERS = {
    "content-security-policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}


async def chat_completions(request: Request) -> Any:
    started = time.perf_counter()
    server = server_of(request)
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
    run = Run(server, [ticket], req.n, started)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if req.stream:
        return event_stream(run, envelope(server, rid, "chat.completion.chunk", created), req.include_usage,
                             _chat_chunks(server, run, schema))
    if not await run.collect(request):
        return Response(status_code=499)
    choices = []
    for i, c in enumerate(run.choices):
        _check_json(schema, c)
        choices.append({"index": i, "message": {"role": "assistant", "content": c.text, "refusal": None},
                        "logprobs": chat_logprobs(server, c.logprobs) if req.logprobs else None,
                        "finish_reason": c.finish or "stop"})
    return JSONResponse({**envelope(server, rid, "chat.completion", created), "choices": choices,
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
        run = Run(server, [server.submit(llm.chat_ids(found.messages()), controls, "messages")], 1, started)
        if not await run.collect(request):
            return Response(status_code=499)
        done = run.tickets[0].run.choices
        answer = found.conclude(run.choices[0].text, done[0].finish_reason if done else run.choices[0].finish)
    shown = answer.cited if answer.found else answer.nearest
    extra = {"sources": [s.as_dict() for s in shown], "found": answer.found}
    usage = run.usage() if run else {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if req.stream:
        base = envelope(server, rid, "chat.completion.chunk", created)

        async def events() -> AsyncIterator[str]:
            yield sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": str(answer)},
                                            "logprobs": None, "finish_reason": None}]})
            yield sse({**base, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}], **extra})
            if req.include_usage:
                yield sse({**base, "choices": [], "usage": usage})
            yield DONE

        return EventStream(events(), run.tickets if run else [])
    message = {"role": "assistant", "content": str(answer), "refusal": None}
    return JSONResponse({**envelope(server, rid, "chat.completion", created),
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


def _check_json(fmt: JsonFormat | None, choice: RunChoice) -> None:
    if fmt is not None and choice.finish == "stop":
        problem = fmt.problem(choice.text)
        if problem:
            log.warning("constrained JSON output does not match the requested format: %s", problem)


async def _chat_chunks(server: Server, run: Run, schema: JsonFormat | None) -> AsyncIterator[dict[str, Any]]:
    def choice(index: int, delta: dict[str, Any], logprobs: Any = None, finish: str | None = None) -> dict[str, Any]:
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

    for i in range(len(run.choices)):
        yield choice(i, {"role": "assistant", "content": ""})
    want_lp = run.tickets[0].run.controls.logprobs is not None
    async for index, delta in run.deltas():
        if delta.text or delta.logprobs:
            yield choice(index, {"content": delta.text}, chat_logprobs(server, delta.logprobs) if want_lp else None)
        if delta.finish_reason:
            _check_json(schema, run.choices[index])
            yield choice(index, {}, None, run.choices[index].finish)


async def completions(request: Request) -> Any:
    started = time.perf_counter()
    server = server_of(request)
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
    run = Run(server, tickets, req.n, started)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    echo = [texts[i // req.n] if req.echo else "" for i in range(len(run.choices))]
    if req.stream:
        return event_stream(run, envelope(server, rid, "text_completion", created), req.include_usage,
                             _completion_chunks(run, echo, req.logprobs is not None))
    if not await run.collect(request):
        return Response(status_code=499)
    choices = [{"index": i, "text": echo[i] + c.text,
                "logprobs": completion_logprobs(c.logprobs, len(echo[i])) if req.logprobs is not None else None,
                "finish_reason": c.finish or "stop"} for i, c in enumerate(run.choices)]
    return JSONResponse({**envelope(server, rid, "text_completion", created), "choices": choices,
                         "usage": run.usage()})


async def _completion_chunks(run: Run, echo: list[str], want_lp: bool) -> AsyncIterator[dict[str, Any]]:
    offsets = [len(e) for e in echo]

    def choice(index: int, text: str, logprobs: Any = None, finish: str | None = None) -> dict[str, Any]:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    for i, e in enumerate(echo):
        if e:
            yield choice(i, e)
    async for index, delta in run.deltas():
        if delta.text or delta.logprobs:
            lp = completion_logprobs(delta.logprobs, offsets[index]) if want_lp else None
            offsets[index] += sum(len(t.token) for t in delta.logprobs)
            yield choice(index, delta.text, lp)
        if delta.finish_reason:
            yield choice(index, "", None, run.choices[index].finish)


def _check_ids(ids: Sequence[int], vocab_size: int, param: str, what: str = "token ids") -> None:
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise S.invalid(f"{what} must be in [0, {vocab_size - 1}], got {bad[:5]}", param)


async def embeddings(request: Request) -> Any:
    server = server_of(request)
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
    """The chat model, and the embedding model once it is in the store (/v1/embeddings does not pull it)."""
    cards = [_model_card(server, server.name, ["chat", "completions"])]
    if server.embedder_available():
        cards.append(_model_card(server, server.config.embed_model, ["embeddings"]))
    return cards


async def list_models(request: Request) -> Any:
    return JSONResponse({"object": "list", "data": _models(server_of(request))})


async def get_model(request: Request) -> Any:
    server = server_of(request)
    name = request.path_params["model"]
    for card in _models(server):
        if card["id"] == name or (name in server.names and "chat" in card["capabilities"]):
            return JSONResponse(card)
    raise S.ApiError(404, f"the model '{name}' does not exist", param="model", code="model_not_found")


async def tokenize(request: Request) -> Any:
    server = server_of(request)
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
    server = server_of(request)
    req: S.DetokenizeRequest = S.parse(S.DetokenizeRequest, await read_json(request))
    llm = server.chat_model(req.model)
    _check_ids(req.tokens, llm.config.vocab_size, "tokens")
    return JSONResponse({"prompt": llm.decode(req.tokens, skip_special_tokens=False)})


async def health(request: Request) -> Any:
    server = server_of(request)
    w = server.worker
    body = {"status": server.status, "model": server.name, "active": w.active if w else 0,
            "queue_depth": w.queue_depth if w else 0, "documents": server.config.index is not None}
    if server.error:
        body["error"] = server.error
    return JSONResponse(body, status_code=200 if server.status == "ok" else 503)


async def metrics(request: Request) -> Any:
    server = server_of(request)
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
