"""Request and response shapes of the OpenAI-compatible API, and how a request becomes controls.

Requests are validated strictly (no coercion: "1" is not a number) with pydantic; any failure is an
`ApiError` with status 400 and the OpenAI error envelope naming the offending parameter, never a 422.
Unknown fields are ignored, as OpenAI-compatible servers do, except those llmos cannot honour
(`tools`, `functions`, `suffix`, `best_of` other than n), which are refused by name.

The response models here document the API in /openapi.json; routes build responses as plain dicts
of the same shape (cheaper per streamed chunk).
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llmos.generation import MAX_LOGPROBS, MAX_STOP_STRINGS

MAX_N = 8  # choices per request
MAX_PROMPTS = 16  # prompts in one /v1/completions request
MAX_STOP = MAX_STOP_STRINGS  # llmos' own limits, checked here too so that a request fails before it queues
MAX_TOP_LOGPROBS = MAX_LOGPROBS
MAX_EMBED_INPUTS = 2048
SEED_MASK = (1 << 63) - 1
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # any signed or unsigned 64-bit integer


class ApiError(Exception):
    """An error answered with the OpenAI envelope {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_error",
             404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
             415: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or self.TYPES.get(status, "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        # A message quoting client text must still encode as UTF-8 (a lone surrogate would not).
        message = self.message.encode("utf-8", "backslashreplace").decode("utf-8")
        return {"error": {"message": message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


# --- requests -------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class ContentPart(_Strict):
    type: Literal["text"] = Field(description="only text parts are supported")
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]  # required: a turn without text is a client bug, not an empty turn
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)

    def turn(self) -> dict[str, str]:
        """The message as a chat-template turn ("developer" is OpenAI's newer name for "system")."""
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text()}


class StreamOptions(_Strict):
    include_usage: bool = False


class JsonSchemaSpec(_Strict):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class _Sampling(_Strict):
    """Fields shared by chat and text completions: OpenAI's, then llmos's extensions."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(default=None)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    seed: int | None = Field(default=None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    user: str | None = None
    # extensions (vLLM / llama.cpp names)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0, le=10)
    min_tokens: int | None = Field(default=None, ge=0)

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk (stream_options.include_usage)."""
        return self.stream_options is not None and self.stream_options.include_usage

    def _stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def check(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise invalid("stream_options is only allowed when stream is true", "stream_options")
        stops = self._stops()
        if len(stops) > MAX_STOP:
            raise invalid(f"at most {MAX_STOP} stop strings are allowed, got {len(stops)}", "stop")
        if "" in stops:
            raise invalid("stop strings must not be empty", "stop")
        if self.min_tokens and self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise invalid(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})", "min_tokens")

    def controls(self, vocab_size: int) -> dict[str, Any]:
        """The generation controls (llmos names) this request asks for; absent fields are left out."""
        c: dict[str, Any] = {"n": self.n}
        for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "min_p", "repetition_penalty"):
            value = getattr(self, name)
            if value is not None:
                c[name] = float(value)
        if self.top_k is not None:
            c["top_k"] = max(self.top_k, 0)  # -1 is vLLM's "off"
        if self.max_tokens is not None:
            c["max_new_tokens"] = self.max_tokens
        if self.min_tokens:
            c["min_new_tokens"] = self.min_tokens
        if self.stop:
            c["stop"] = self._stops()
        if self.seed is not None:
            c["seed"] = self.seed & SEED_MASK
        if self.logit_bias:
            c["logit_bias"] = parse_logit_bias(self.logit_bias, vocab_size)
        return c


def parse_logit_bias(bias: dict[str, float], vocab_size: int) -> dict[int, float]:
    out: dict[int, float] = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise invalid(f"logit_bias keys must be token ids, got {key!r}", "logit_bias") from None
        if not 0 <= token < vocab_size:
            raise invalid(f"logit_bias token id {token} is outside the vocabulary (0..{vocab_size - 1})", "logit_bias")
        if not -100 <= value <= 100:
            raise invalid(f"logit_bias values must be in [-100, 100], got {value} for token {token}", "logit_bias")
        out[token] = float(value)
    return out


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    # vLLM's: honoured only by a server started with --trust-request-chat-template (refused otherwise)
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    # llmos's: answer the last user message from the server's --index (grounded, cited; see tasks/qa.py)
    documents: bool = False

    def check(self) -> None:
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        super().check()
        if self.tools or self.functions:
            raise invalid("tools and function calling are not supported by this server",
                          "tools" if self.tools else "functions")
        if self.top_logprobs is not None and not self.logprobs:
            raise invalid("top_logprobs requires logprobs to be true", "top_logprobs")
        if self.documents and (self.n != 1 or self.response_format is not None or self.logprobs):
            param = "n" if self.n != 1 else "response_format" if self.response_format is not None else "logprobs"
            raise invalid("documents=true answers once, as text, without logprobs", param)
        rf = self.response_format
        if rf is not None and rf.type == "json_schema" and rf.json_schema is None:
            raise invalid("response_format of type json_schema needs a json_schema object", "response_format.json_schema")

    def controls(self, vocab_size: int) -> dict[str, Any]:
        c = super().controls(vocab_size)
        if self.logprobs:
            c["logprobs"] = self.top_logprobs or 0
        if self.response_format is not None:  # the library constrains the output (llmos.json_constraint)
            c["response_format"] = self.response_format.model_dump(by_alias=True, exclude_none=True)
        return c


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1, le=MAX_N)

    def check(self) -> None:
        super().check()
        if self.suffix:
            raise invalid("suffix (insertion) is not supported by this server", "suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise invalid("best_of other than n is not supported by this server", "best_of")
        if self.echo and self.logprobs is not None:
            raise invalid("echo with logprobs is not supported (prompt log-probabilities are not computed)", "echo")
        prompts = self.prompts()
        if not prompts:
            raise invalid("prompt must not be empty", "prompt")
        if len(prompts) * self.n > MAX_PROMPTS:
            raise invalid(f"at most {MAX_PROMPTS} choices per request (prompts x n), got {len(prompts) * self.n}", "prompt")

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [p]  # one prompt as token ids
        return list(p)

    def controls(self, vocab_size: int) -> dict[str, Any]:
        c = super().controls(vocab_size)
        if self.logprobs is not None:
            c["logprobs"] = self.logprobs
        return c


class EmbeddingRequest(_Strict):
    input: str | list[str]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None

    def texts(self) -> list[str]:
        texts = [self.input] if isinstance(self.input, str) else list(self.input)
        if not texts:
            raise invalid("input must not be an empty list", "input")
        if len(texts) > MAX_EMBED_INPUTS:
            raise invalid(f"at most {MAX_EMBED_INPUTS} inputs per request, got {len(texts)}", "input")
        for i, t in enumerate(texts):
            if not t:
                raise invalid(f"input[{i}] is an empty string", "input")
        return texts


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


# --- responses (documentation) ----------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobOut(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobOut] | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: Literal["stop", "length", "abort"]  # abort: cancelled by the server's shutdown


class AnswerSource(BaseModel):
    """A sentence of an indexed document that a documents=true answer cites as [number]."""

    number: int
    path: str
    location: str
    heading: list[str]
    quote: str
    line_start: int
    line_end: int
    page: int | None = None
    score: float


class ChatCompletion(BaseModel):
    """A chat completion; with stream=true, `chat.completion.chunk` events of the same shape with
    `delta` in place of `message`, ending with `data: [DONE]`."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage
    # with documents=true: what the answer stands on (the closest sentences when it declined)
    sources: list[AnswerSource] | None = None
    found: bool | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length", "abort"]


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    capabilities: list[str]


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


class Tokens(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class Detokenized(BaseModel):
    prompt: str


class Health(BaseModel):
    status: Literal["ok", "loading", "error"]
    model: str
    active: int = 0
    queue_depth: int = 0
    error: str | None = None
    documents: bool = False  # the server answers documents=true requests (started with --index)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class Error(BaseModel):
    error: ErrorDetail


# --- parsing ------------------------------------------------------------------------------------------------

_MODEL_NAMES = {cls.__name__ for cls in (ContentPart, ChatMessage, StreamOptions, JsonSchemaSpec, ResponseFormat)}


def _param(loc: tuple[Any, ...]) -> str:
    """A pydantic error location as an OpenAI param: ('messages', 0, 'role') -> 'messages[0].role'.
    Union member tags ('str', 'list[int]', 'ChatMessage'...) are left out."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _MODEL_NAMES or "[" in part or part in ("str", "int", "float", "bool", "dict", "list", "none"):
            continue
        else:
            out += ("." if out else "") + ("schema" if part == "schema_" else part)
    return out


def parse(model: type[_Strict], body: Any) -> Any:
    """Validate a decoded JSON body into `model`, or raise ApiError 400 naming the parameter."""
    if not isinstance(body, dict):
        raise invalid(f"the request body must be a JSON object, got {_json_type(body)}")
    try:
        request = model.model_validate(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        first = _param(errors[0]["loc"])
        same = [e for e in errors if _param(e["loc"]).startswith(first)]
        best = max(same, key=lambda e: len(e["loc"]))
        param = _param(best["loc"]) or None
        where = f"'{param}'" if param else "the request"
        if best["type"] == "missing":
            raise invalid(f"missing required parameter: {where}", param, "missing_required_parameter") from None
        raise invalid(f"invalid value for {where}: {best['msg']}", param) from None
    check = getattr(request, "check", None)
    if check is not None:
        check()
    return request


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array"}
    return names.get(type(value), type(value).__name__)


def decode_body(raw: bytes) -> Any:
    """Decode a request body as JSON, or raise ApiError 400. Strings must be valid Unicode: JSON can
    spell a lone UTF-16 surrogate ("\\ud800"), which no tokenizer or UTF-8 response can hold."""
    if not raw.strip():
        raise invalid("the request body is empty: send a JSON object")
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise invalid(f"the request body is not valid JSON: {exc}") from None
    if _SURROGATE_ESCAPE.search(raw):  # only an escape can spell one: raw surrogate bytes are not UTF-8
        try:
            where = _surrogate_at(body, "")
        except RecursionError:
            raise invalid("the request body nests arrays or objects too deeply") from None
        if where is not None:
            raise invalid(f"'{where or 'the request body'}' holds a lone UTF-16 surrogate (an unpaired "
                          "\\ud800-\\udfff escape), which is not valid Unicode; send valid text", where or None)
    return body


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _surrogate_at(value: Any, path: str) -> str | None:
    """The OpenAI-style path ("messages[0].content") of the first string holding a lone surrogate;
    a key holding one is reported as its object's path."""
    if isinstance(value, str):
        return path if _LONE_SURROGATE.search(value) else None
    if isinstance(value, dict):
        if any(_LONE_SURROGATE.search(k) for k in value):
            return path
        items = [(f"{path}.{k}" if path else k, v) for k, v in value.items()]
    elif isinstance(value, list):
        items = [(f"{path}[{i}]", v) for i, v in enumerate(value)]
    else:
        return None
    return next((found for where, v in items if (found := _surrogate_at(v, where)) is not None), None)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")
