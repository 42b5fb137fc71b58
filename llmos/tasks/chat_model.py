"""What the tasks need from a model: the typed surface `ask`, `summarize` and `translate` are written against.

`llmos.LLM` satisfies it; so does any object with these members (a test double, a remote model
behind the same calls). The tasks import this Protocol, never `llmos.api`, so the API may build on
the tasks without the two importing each other.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from llmos.config import ModelConfig
from llmos.generation import Completion, TextGeneration
from llmos.tokenizer import Tokenizer


class ChatModel(Protocol):
    config: ModelConfig
    tokenizer: Tokenizer  # base models (no chat template) get plain prompts from it (tokenizer.text_ids)
    path: Path  # the model's file or folder: the languages it declares are read from there

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def chat_ids(self, messages: list[dict[str, str]], add_generation_prompt: bool = True, *,
                 template: str | None = None, variables: dict[str, Any] | None = None) -> list[int]: ...

    def start(self, ids: list[int], controls: dict[str, Any], *, defaults: dict[str, Any] | None = None,
              default_new: int = 256, cache: Any = None, cached: int = 0) -> TextGeneration: ...

    def chat(self, messages: list[dict[str, str]], **controls: Any) -> Completion: ...

    def chat_stream(self, messages: list[dict[str, str]], **controls: Any) -> Iterator[str]: ...
