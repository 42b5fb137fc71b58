"""The Python API: `llmos.load(name_or_path) -> LLM`, text in, text out.

An LLM joins a model, its tokenizer and the engine. Names are resolved by the model store (default
models are pulled on first use); a path to a GGUF file or a Hugging Face folder runs in place.
Every generation returns a `Completion`, a str that also reports token counts and why it stopped.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from llmos import quality, store
from llmos.config import ModelConfig
from llmos.engine.generate import Generation
from llmos.engine.sampling import SamplingParams
from llmos.errors import LlmosError
from llmos.tokenizer import Tokenizer
from llmos.weights.gguf import GGUFFile
from llmos.weights.load import read_hf_config

DTYPES = {"auto": "auto", "fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16", "int8": "int8", "int4": "int4"}

# Defaults for free text, as llama.cpp and Ollama ship them; temperature=0 asks for greedy decoding.
DEFAULT_SAMPLING = {"temperature": 0.8, "top_k": 40, "top_p": 0.95}
_SAMPLING_KEYS = set(SamplingParams.__dataclass_fields__)


class Completion(str):
    """Generated text, with `prompt_tokens`, `completion_tokens`, `finish_reason` and `token_ids`."""

    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    token_ids: list[int]

    def __new__(cls, text: str, prompt_tokens: int, token_ids: list[int], finish_reason: str) -> Completion:
        self = super().__new__(cls, text)
        self.prompt_tokens, self.token_ids = prompt_tokens, token_ids
        self.completion_tokens, self.finish_reason = len(token_ids), finish_reason
        return self


def sampling_from(controls: dict[str, Any]) -> tuple[SamplingParams, dict[str, Any]]:
    """Split keyword arguments into SamplingParams and the rest (after defaults)."""
    merged = {**DEFAULT_SAMPLING, **controls}
    params = {k: merged.pop(k) for k in list(merged) if k in _SAMPLING_KEYS}
    return SamplingParams(**params), merged


class LLM:
    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, config: ModelConfig, path: Path) -> None:
        self.model, self.tokenizer, self.config, self.path = model, tokenizer, config, path
        self.dtype = "fp32"

    @classmethod
    def load(cls, name_or_path: str | Path = store.DEFAULT_CHAT_MODEL, dtype: str = "auto") -> LLM:
        """dtype: "auto" (the fastest form within 2% of fp32 perplexity), "fp32", "bf16", "int8", "int4"."""
        if dtype not in DTYPES:
            raise LlmosError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        path = store.resolve(str(name_or_path))
        if not path.is_file() and read_hf_config(path).arch == "bert":
            raise LlmosError(f"{path} is an encoder (BERT) model: use llmos.Embedder for embeddings, not text generation")
        form = quality.auto_form(path) if dtype == "auto" else DTYPES[dtype]
        model, config, tokenizer = quality.load_form(path, form)
        llm = cls(model, tokenizer, config, path)
        llm.dtype = form
        return llm

    # --- tokens ---------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @torch.inference_mode()
    def logits(self, ids: Sequence[int]) -> torch.Tensor:
        """Next-token logits at every position: (len(ids), vocab) float32."""
        if not ids:
            raise LlmosError("logits() needs at least one token id")
        tokens = torch.tensor([list(ids)], dtype=torch.long)
        if int(tokens.max()) >= self.config.vocab_size or int(tokens.min()) < 0:
            raise LlmosError(f"token ids must be in [0, {self.config.vocab_size}), got {tokens.min().item()}..{tokens.max().item()}")
        return self.model(tokens, torch.arange(tokens.shape[1]))[0].float()

    # --- generation -----------------------------------------------------------------------------
    def _run(self, ids: list[int], max_new_tokens: int, controls: dict[str, Any]) -> tuple[Generation, Iterator[int]]:
        params, rest = sampling_from(controls)
        seed = rest.pop("seed", None)
        min_new = rest.pop("min_new_tokens", 0)
        if rest:
            raise LlmosError(f"unknown generation argument(s): {', '.join(sorted(rest))}")
        gen = Generation(
            self.model, ids, max_new_tokens=max_new_tokens, params=params,
            stop_ids=self.tokenizer.stop_ids, min_new_tokens=min_new, seed=seed,
        )
        return gen, gen.tokens()

    def stream(self, prompt: str, max_new_tokens: int = 256, **controls: Any) -> Iterator[str]:
        """Text pieces as tokens are produced (UTF-8 safe)."""
        return self._stream(self.encode(prompt), max_new_tokens, controls)

    def _stream(self, ids: list[int], max_new_tokens: int, controls: dict[str, Any]) -> Iterator[str]:
        gen, tokens = self._run(ids, max_new_tokens, controls)  # validates before the first next()
        decoder = self.tokenizer.decoder()

        def pieces() -> Iterator[str]:
            for t in tokens:
                piece = decoder.push(t)
                if piece:
                    yield piece
            tail = decoder.flush()
            if tail:
                yield tail

        return pieces()

    def generate(self, prompt: str, max_new_tokens: int = 256, **controls: Any) -> Completion:
        """Continue `prompt`; returns the new text only."""
        return self._complete(self.encode(prompt), max_new_tokens, controls)

    def _complete(self, ids: list[int], max_new_tokens: int, controls: dict[str, Any]) -> Completion:
        gen, tokens = self._run(ids, max_new_tokens, controls)
        out = list(tokens)
        return Completion(self.decode(out), len(ids), out, gen.finish_reasons[0] or "length")

    def chat(self, messages: list[dict[str, str]], max_new_tokens: int = 512, **controls: Any) -> Completion:
        """Reply to a conversation, rendered with the model's chat template."""
        return self._complete(self._chat_ids(messages), max_new_tokens, controls)

    def chat_stream(self, messages: list[dict[str, str]], max_new_tokens: int = 512, **controls: Any) -> Iterator[str]:
        return self._stream(self._chat_ids(messages), max_new_tokens, controls)

    def _chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        # The template already wrote any BOS the model wants.
        return self.encode(text, add_special_tokens=False)


def load_tokenizer(name_or_path: str | Path = store.DEFAULT_CHAT_MODEL) -> Tokenizer:
    """Only the tokenizer of a model (no weights are read)."""
    path = store.resolve(str(name_or_path))
    if path.is_file():
        return Tokenizer.from_gguf(GGUFFile(path).metadata)
    return Tokenizer.from_dir(path)


def load(name_or_path: str | Path = store.DEFAULT_CHAT_MODEL, dtype: str = "auto") -> LLM:
    """Load a model by store name or path (GGUF file or Hugging Face folder)."""
    return LLM.load(name_or_path, dtype=dtype)
