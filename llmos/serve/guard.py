"""The outermost request checks (`Guard`: Host, Origin, API key, content type, body size, metrics by
route) and the error handlers that turn every failure into the OpenAI error envelope."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from llmos.serve import schema as S
from llmos.serve.endpoints import Endpoint, endpoint_of
from llmos.serve.server import Server, too_large

log = logging.getLogger("llmos.serve")


def error_response(err: S.ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


async def api_error(request: Request, exc: Exception) -> Response:
    return error_response(exc)  # type: ignore[arg-type]


async def http_error(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 500)
    message = {404: f"no route {request.method} {request.url.path}", 405: f"method {request.method} is not allowed here"}
    return error_response(S.ApiError(status, message.get(status, str(getattr(exc, "detail", exc))),
                                      code={404: "not_found", 405: "method_not_allowed"}.get(status)))


async def internal_error(request: Request, exc: Exception) -> Response:
    log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(S.ApiError(500, "internal server error (logged on the server)", code="internal_error"))


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
                await error_response(error)(scope, receive, record)
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
                return too_large(self.server.config.max_body_bytes)
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
