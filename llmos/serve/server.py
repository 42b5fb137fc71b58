"""What the routes share: the served model's settings (`ServeConfig`) and state (`Server`: the model,
loaded in the background, its worker, metrics, the embedder and the document index), and reading a
request's JSON body within the size cap."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.types import Scope

from llmos import __version__, store
from llmos.errors import ContextLengthError, LlmosError
from llmos.generation import parse_controls
from llmos.json_constraint import token_texts
from llmos.serve import schema as S
from llmos.serve.metrics import Metrics
from llmos.serve.worker import QueueFull, Ticket, Worker

log = logging.getLogger("llmos.serve")


# OpenAI's neutral sampling values: what a control the model's recommendation does not name gets.
OPENAI_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}
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

    def embedder_available(self) -> bool:
        """Whether /v1/embeddings can answer: its model is loaded, or in the store (it never pulls one)."""
        if self.embedder is not None:
            return True
        try:
            store.resolve(self.config.embed_model, pull_missing=False)
        except LlmosError:
            return False
        return True

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


def server_of(request: Request) -> Server:
    return request.app.state.server


async def read_json(request: Request) -> Any:
    cap = server_of(request).config.max_body_bytes
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > cap:
            raise too_large(cap)
    return S.decode_body(bytes(body))


def too_large(cap: int) -> S.ApiError:
    return S.ApiError(413, f"the request body is larger than this server's limit of {cap} bytes",
                      code="request_too_large")
