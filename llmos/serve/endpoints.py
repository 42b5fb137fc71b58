"""The one table of routes (`ENDPOINTS`): what Starlette dispatches, what /openapi.json documents,
the label /metrics counts requests under, and which routes are open without the API key."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import compile_path

from llmos import __version__
from llmos.serve import schema as S
from llmos.serve.routes import (
    chat_completions, completions, detokenize, embeddings, get_model, health, list_models, metrics, page, tokenize,
)


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
