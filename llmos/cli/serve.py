"""`llmos serve`: the OpenAI-compatible API and the web chat page on http://127.0.0.1:8000.

Safe by default: binds the loopback interface; refuses any other address unless an API key is set
(--api-key-file, or the LLMOS_API_KEY environment variable); CORS is off unless origins are listed;
the model must already be in the store or on disk (the server never downloads anything).
Browsers on other sites cannot use it: the Host header must name the bound address (or an
--allowed-host), a foreign Origin is refused, and POSTs must be application/json.
SIGTERM or Ctrl-C stops accepting connections, lets in-flight requests run for --shutdown-timeout
seconds, then ends what is left with finish_reason "abort" and exits.
"""

from __future__ import annotations

import argparse
import ipaddress
from dataclasses import replace
import logging
import os
import sys
from pathlib import Path
from typing import Any

from llmos.cli.argtypes import int_in
from llmos.cli.generate import add_model_args
from llmos.errors import LlmosError


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP API and web chat page")
    add_model_args(p)  # --model, --dtype, --threads
    p.add_argument("--host", default="127.0.0.1", help="address to bind (non-loopback needs an API key)")
    p.add_argument("--port", type=int_in(1, 65535), default=8000)
    p.add_argument("--api-key-file", default=None, help="file holding the API key (else $LLMOS_API_KEY)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser requests from this origin (repeatable); off by default")
    p.add_argument("--max-active", type=int, default=16, help="generations interleaved at once")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond those; more get 503")
    p.add_argument("--max-body-bytes", type=int, default=4 << 20, help="request body size cap")
    p.add_argument("--default-max-tokens", type=int, default=512, help="completion length when a request sets none")
    p.add_argument("--default-temperature", type=float, default=None, metavar="T",
                   help="for requests that set none (default: the model's recommendation, printed at start-up)")
    p.add_argument("--default-top-p", type=float, default=None, metavar="P", help="likewise")
    p.add_argument("--default-top-k", type=int, default=None, metavar="K", help="likewise")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="a Host name clients may use besides the bound address, e.g. behind a proxy (repeatable; "
                        "'*' turns the DNS-rebinding check off)")
    p.add_argument("--trust-request-chat-template", action="store_true",
                   help="let requests pass their own chat_template / chat_template_kwargs (refused otherwise)")
    p.add_argument("--shutdown-timeout", type=int_in(0), default=30, metavar="SECONDS",
                   help="on SIGTERM, how long in-flight requests may run before they are aborted")
    p.add_argument("--index", default=None, metavar="PATH",
                   help="document index (llmos index add): requests with documents=true, and the chat page's "
                        "'Answer from documents', are answered from it with sources")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=run_serve)


def read_api_key(path: str | None) -> str | None:
    if path:
        try:
            key = Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise LlmosError(f"cannot read the API key file {path}: {exc.strerror}") from None
        if not key:
            raise LlmosError(f"the API key file {path} is empty")
        return key
    return os.environ.get("LLMOS_API_KEY", "").strip() or None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_bindable(host: str, port: int) -> None:
    """Fail with one line now if the address cannot be bound (in use, not this machine's)."""
    import socket

    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            s.bind(address)
    except OSError as exc:
        raise LlmosError(f"cannot listen on --host {host} --port {port}: {exc.strerror or exc}") from None


def serve_sampling(args: argparse.Namespace, path: Path) -> dict[str, float]:
    """The model's recommended sampling, with the --default-* flags over it."""
    from llmos.serve.server import sampling_defaults

    flags = {"temperature": args.default_temperature, "top_p": args.default_top_p, "top_k": args.default_top_k}
    return sampling_defaults(path, {k: v for k, v in flags.items() if v is not None})


def run_serve(args: argparse.Namespace) -> int:
    from llmos import store

    key = read_api_key(args.api_key_file)
    if not is_loopback(args.host) and key is None:
        raise LlmosError(f"refusing to serve on {args.host} without an API key: pass --api-key-file FILE or set "
                         "LLMOS_API_KEY (or bind 127.0.0.1)")
    limits = (("--max-active", args.max_active, 1), ("--max-queue", args.max_queue, 0),
              ("--max-body-bytes", args.max_body_bytes, 1024), ("--default-max-tokens", args.default_max_tokens, 1))
    for name, value, low in limits:
        if value < low:
            raise LlmosError(f"{name} must be at least {low}, got {value}")
    if args.index is not None and not Path(args.index).expanduser().is_file():
        raise LlmosError(f"--index {args.index}: no such index file; create one with `llmos index add PATH... --index {args.index}`")
    path = store.resolve(args.model, pull_missing=False)  # fail now, in the terminal, and never download
    check_bindable(args.host, args.port)  # before the model loads, not after
    try:
        import uvicorn

        from llmos.serve.app import ServeConfig, create_app
    except ImportError as exc:
        raise LlmosError(f"the server needs {exc.name}, a dependency of llmos that is missing here: "
                         f"pip install {exc.name}") from None
    config = ServeConfig(model=args.model, dtype=args.dtype, api_key=key, cors_origins=tuple(args.cors_origin),
                         max_active=args.max_active, max_queue=args.max_queue, max_body_bytes=args.max_body_bytes,
                         default_max_tokens=args.default_max_tokens, threads=args.threads, host=args.host,
                         allowed_hosts=tuple(args.allowed_host), trust_request_templates=args.trust_request_chat_template,
                         index=str(Path(args.index).expanduser()) if args.index else None)
    config = replace(config, sampling=serve_sampling(args, path))  # printed below, before the model loads
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"llmos serve: {config.served_name} on http://{shown}:{args.port}/ (API at /v1"
          f"{', key required' if key else ''}); loading the model...", file=sys.stderr, flush=True)
    shown_defaults = ", ".join(f"{k} {v:g}" for k, v in config.sampling.items())
    print(f"llmos serve: requests that set none get {shown_defaults}, max_tokens {config.default_max_tokens} "
          "(--default-temperature, --default-top-p, --default-top-k, --default-max-tokens)", file=sys.stderr, flush=True)
    run_uvicorn(create_app(config), args.host, args.port, args.log_level, args.shutdown_timeout)
    return 0


def run_uvicorn(app: Any, host: str, port: int, log_level: str, shutdown_timeout: int) -> None:
    """uvicorn with the envelope-answering h11 protocol, and a shutdown that drains for at most
    `shutdown_timeout` seconds before the app aborts what is left."""
    import uvicorn

    from llmos.serve.protocol import MAX_HEADER_BYTES, EnvelopeH11Protocol

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if not self.should_exit:  # the first signal starts the grace period
                app.state.server.drain(shutdown_timeout)
            super().handle_exit(sig, frame)

    # uvicorn's own deadline is a backstop: the app aborts its requests first, so their streams end cleanly.
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, server_header=False, forwarded_allow_ips="",
                            http=EnvelopeH11Protocol, h11_max_incomplete_event_size=MAX_HEADER_BYTES,
                            timeout_graceful_shutdown=shutdown_timeout + 5)
    server = Server(config)
    server.run()
    if not server.started:  # as uvicorn.run: the socket could not be bound, or the app failed to start
        raise LlmosError(f"the server did not start on {host}:{port}; see the log above")
