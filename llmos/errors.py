"""The one exception type users catch: every error that is the user's to fix is an LlmosError."""

from __future__ import annotations


class LlmosError(ValueError):
    """Bad input, a missing model, a refused file: the message says what was wrong and what to do.
    `param` names the argument at fault when there is one, so an API can point at it."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        # One line, always: a message may quote a library's multi-line error text.
        super().__init__("; ".join(part.strip() for part in message.splitlines() if part.strip()) or message)
        self.param = param


class ContextLengthError(LlmosError):
    """A prompt and the tokens asked for do not fit the model's context. `requested` is the
    max_new_tokens the caller asked for (None when it asked for none)."""

    def __init__(self, message: str, *, prompt_tokens: int, requested: int | None, context: int) -> None:
        super().__init__(message, param="max_new_tokens" if requested is not None else "prompt")
        self.prompt_tokens, self.requested, self.context = prompt_tokens, requested, context
