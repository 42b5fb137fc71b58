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

The application is put together here from modules by concern: `server` (settings and shared state),
`routes` (the handlers), `results` (response building and streaming), `endpoints` (the route table
and the OpenAPI document), `guard` (request checks and the error envelope).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Route

from llmos.serve import schema as S
from llmos.serve.endpoints import ENDPOINTS, openapi_document
from llmos.serve.guard import Guard, api_error, http_error, internal_error
from llmos.serve.server import Server, ServeConfig

__all__ = ["ServeConfig", "create_app"]


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
        S.ApiError: api_error, HTTPException: http_error, Exception: internal_error})
    app.state.server = server
    app.state.openapi = openapi_document()
    return app
