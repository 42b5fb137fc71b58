"""The Python API: `llmos.load(name_or_path) -> LLM`, text in, text out.

An LLM joins a model, its tokenizer and the engine. Names are resolved by the model store (default
models are pulled on first use); a path to a GGUF file or a Hugging Face folder runs in place.
Every generation returns a `Completion`, a str that also reports token counts and why it stopped.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from llmos import quality, store
from llmos.config import ModelConfig
from llmos.engine import native
from llmos.errors import LlmosError
from llmos.generation import Completion, TextGeneration, complete, fit_prompt, parse_controls
from llmos.models.kernels import PYTORCH, Kernels
from llmos.models.kv_cache import KVCache, cache_dtype
from llmos.threads import auto_threads, mark_auto
from llmos.tokenizer import Tokenizer
from llmos.weights import loader

DTYPES = {"auto": "auto", "fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16", "int8": "int8", "int4": "int4", "gguf": "gguf"}

# Defaults for free text, as llama.cpp and Ollama ship them; temperature=0 asks for greedy decoding.
DEFAULT_SAMPLING = {"temperature": 0.8, "top_k": 40, "top_p": 0.95}


class LLM:
    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, config: ModelConfig, path: Path, *,
                 dtype: str = "fp32", kernels: Kernels = PYTORCH) -> None:
        self.model, self.tokenizer, self.config, self.path = model, tokenizer, config, path
        self.dtype = dtype  # the weight form
        self.kv_dtype = loader.kv_dtype(dtype)  # of every KV cache this model's generations make
        self.kernels = kernels  # installed on the model (models/kernels.py)

    @classmethod
    def load(cls, name_or_path: str | Path = store.DEFAULT_CHAT_MODEL, dtype: str = "auto", *,
             threads: int | None = None, quiet: bool = False) -> LLM:
        """dtype: "auto" (the fastest form within 2% of fp32 perplexity), "fp32", "bf16", "int8", "int4",
        "gguf" (a GGUF file's own quantized blocks, run as they are).

        threads: CPU threads for torch; by default the cores other work leaves idle (as the CLI
        picks them), unless OMP_NUM_THREADS says otherwise. The first load of a model measures and
        converts (~15 s) and says so on stderr unless `quiet`."""
        if dtype not in DTYPES:
            raise LlmosError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise LlmosError(f"threads must be an integer >= 1, got {threads!r}", param="threads")
        path = store.resolve(str(name_or_path))
        if store.kind_of(path) == "hf" and loader.read_config(path).arch == "bert":
            raise LlmosError(f"{path} is an encoder (BERT) model: use llmos.Embedder for embeddings, not text generation")
        if threads is not None or "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(threads or auto_threads())
            if threads is None:
                mark_auto()  # looked at again before each generation (llmos/threads.py)
        kernels = native.kernels()  # the C++ kernels: compiled on the first load on a machine, imported after
        form = quality.auto_form(path, quiet=quiet, kernels=kernels) if dtype == "auto" else DTYPES[dtype]
        model, config, tokenizer = loader.load_model(path, form, kernels=kernels)
        native.keep_freed_memory()  # for the prompts to come (after the load: see its docstring)
        return cls(model, tokenizer, config, path, dtype=form, kernels=kernels)

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
    def start(self, ids: list[int], controls: dict[str, Any], *, defaults: dict[str, Any] | None = None,
              default_new: int = 256, cache: KVCache | None = None, cached: int = 0) -> TextGeneration:
        """A generation request over token ids, validated and budgeted, not yet run: iterate it
        for Deltas (the server and the chat session build on this)."""
        parsed = parse_controls(controls, DEFAULT_SAMPLING if defaults is None else defaults)
        budget = fit_prompt(list(ids), parsed, self.config.max_seq_len, default_new)
        return TextGeneration(self.model, self.tokenizer, budget, parsed, cache, cached, self.kv_dtype)

    def generate(self, prompt: str, **controls: Any) -> Completion:
        """Continue `prompt`; returns the new text only (a Completion: also counts and finish reason).

        Controls: max_new_tokens / max_length, min_new_tokens, temperature (0 = greedy), top_k, top_p,
        min_p, repetition_penalty, presence_penalty, frequency_penalty, no_repeat_ngram_size, logit_bias,
        stop, seed, n / num_return_sequences, logprobs / top_logprobs, num_beams, length_penalty,
        early_stopping, truncate ("left" | "right"), repetition_guard."""
        return complete(self.start(self.encode(prompt), controls))

    def stream(self, prompt: str, **controls: Any) -> Iterator[str]:
        """Text pieces as tokens are produced (UTF-8 safe; stop strings never leak)."""
        return self._pieces(self.start(self.encode(prompt), controls))

    def chat_ids(self, messages: list[dict[str, str]], add_generation_prompt: bool = True, *,
                 template: str | None = None, variables: dict[str, Any] | None = None) -> list[int]:
        """The token ids of a conversation rendered with the model's chat template (or `template`).

        The template already writes any BOS the model wants; message texts never become special
        tokens (chat, ask, summarize and translate all build their prompts here)."""
        return self.tokenizer.chat_ids(messages, add_generation_prompt, template=template, variables=variables)

    def chat(self, messages: list[dict[str, str]], **controls: Any) -> Completion:
        """Reply to a conversation, rendered with the model's chat template."""
        return complete(self.start(self.chat_ids(messages), controls, default_new=512))

    def chat_stream(self, messages: list[dict[str, str]], **controls: Any) -> Iterator[str]:
        return self._pieces(self.start(self.chat_ids(messages), controls, default_new=512))

    # --- tasks (thin: the work lives in llmos/tasks/) --------------------------------------------
    def ask(self, question: str, index: Any = None, **kwargs: Any) -> Any:
        """Answer from your documents (an llmos.Index), citing them as [n]; plain chat QA without one."""
        from llmos.tasks.qa import ask

        return ask(self, question, index=index, **kwargs)

    def summarize(self, text: str, words: int = 150, style: str = "paragraph", **controls: Any) -> str:
        """Summarize text of any length (map-reduce over chunks that fit the context)."""
        from llmos.tasks.summarize import summarize

        return summarize(self, text, words=words, style=style, **controls)

    def translate(self, text: str, to: str = "fr", source: str | None = None, *, model: str | LLM | None = None,
                  **controls: Any) -> str:
        """Translate text, keeping Markdown structure and code as they are.

        `model`: the LLM (or a name or path to load) that translates. By default the multilingual
        translation model (gemma3-270m, an error naming `llmos pull gemma3-270m` when it is not pulled)
        stands in for the default chat model, which was trained on English only; any other model
        translates itself."""
        from llmos.tasks.translate import DEFAULT_MODEL, translate

        if model is None and self._is_default_chat_model():
            model = DEFAULT_MODEL
        if isinstance(model, str):
            model = _load_translator(model, self.dtype)
        return translate(model or self, text, to=to, source=source, **controls)

    def _is_default_chat_model(self) -> bool:
        try:
            return Path(self.path).resolve().parent == (store.home() / "models" / store.DEFAULT_CHAT_MODEL).resolve()
        except (OSError, LlmosError):
            return False

    def session(self, system: str | None = None, **controls: Any) -> ChatSession:
        """A conversation that keeps its KV cache between turns (see ChatSession)."""
        return ChatSession(self, system, controls)

    @staticmethod
    def _pieces(run: TextGeneration) -> Iterator[str]:
        if run.controls.n != 1:
            raise LlmosError("streaming text gives one sequence: use n=1 (or generate() for several)")

        def pieces() -> Iterator[str]:
            for delta in run:
                if delta.text:
                    yield delta.text

        return pieces()


class ChatSession:
    """A multi-turn chat that reuses the KV cache of the shared history prefix between turns.

    Each turn renders the whole history with the chat template, finds how many leading tokens are
    already in the cache from the previous turn, and prefills only the rest: a long conversation
    does not re-read everything each turn. `last_prefilled` counts the tokens the last turn read.
    """

    def __init__(self, llm: LLM, system: str | None = None, controls: dict[str, Any] | None = None) -> None:
        self.llm, self.controls = llm, dict(controls or {})
        self.messages: list[dict[str, str]] = []
        self.reset(system)
        self.cache: KVCache | None = None
        self.cache_ids: list[int] = []  # the tokens whose keys/values the cache holds, in order
        self.last_prefilled = 0

    def reset(self, system: str | None = None) -> None:
        self.messages = [{"role": "system", "content": system}] if system else []

    def send(self, text: str, **controls: Any) -> Iterator[str]:
        """Add a user turn and stream the reply; the reply joins the history when the stream ends
        (also when the caller stops it early, with what was produced so far)."""
        self.messages.append({"role": "user", "content": text})
        try:
            ids = self.llm.chat_ids(self.messages)
            run = self.llm.start(ids, {**self.controls, **controls}, default_new=512)
        except Exception:
            self.messages.pop()
            raise
        return self._run(run)

    def _run(self, run: TextGeneration) -> Iterator[str]:
        ids = run.budget.ids
        cached = _common_prefix(self.cache_ids, ids)
        self.cache = self._cache_for(len(ids) + run.budget.max_new_tokens)
        run.cache, run.cached = self.cache, cached
        self.last_prefilled = len(ids) - min(cached, len(ids) - 1)
        reply: list[str] = []
        produced: list[int] = []
        try:
            for delta in run:
                produced.extend(delta.token_ids)
                if delta.text:
                    reply.append(delta.text)
                    yield delta.text
        finally:
            self.messages.append({"role": "assistant", "content": "".join(reply)})
            self.cache_ids = (ids + produced)[: self.cache.length]

    def _cache_for(self, need: int) -> KVCache:
        config = self.llm.config
        if self.cache is not None and self.cache.max_len >= need:
            return self.cache
        size = min(config.max_seq_len, max(need, 2 * (self.cache.max_len if self.cache else 512)))
        fresh = KVCache.for_model(config, 1, size, cache_dtype(self.llm.model, self.llm.kv_dtype))
        if self.cache is not None:  # keep what is cached
            n = self.cache.length
            fresh.k[:, :, :, :n] = self.cache.k[:, :, :, :n]
            fresh.v[:, :, :, :n] = self.cache.v[:, :, :, :n]
            fresh.length = n
        return fresh

    def save(self) -> list[dict[str, str]]:
        return [dict(m) for m in self.messages]

    def load(self, messages: list[dict[str, str]]) -> None:
        self.messages = [dict(m) for m in messages]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


_translators: dict[tuple[str, str], LLM] = {}


def _load_translator(name: str, dtype: str) -> LLM:
    """The translation model by name, loaded once per process; a built-in name must be pulled
    already (translating never downloads a second model unasked)."""
    key = (name, dtype)
    if key not in _translators:
        if name in store.DEFAULT_MODELS:
            store.resolve(name, pull_missing=False)  # not pulled: one line saying `llmos pull NAME`
        _translators[key] = LLM.load(name, dtype="auto" if dtype not in DTYPES else dtype, quiet=True)
    return _translators[key]


def load_tokenizer(name_or_path: str | Path = store.DEFAULT_CHAT_MODEL) -> Tokenizer:
    """Only the tokenizer of a model (no weights are read)."""
    return loader.read_tokenizer(name_or_path)


def load(name_or_path: str | Path = store.DEFAULT_CHAT_MODEL, dtype: str = "auto", *, threads: int | None = None,
         quiet: bool = False) -> LLM:
    """Load a model by store name or path (GGUF file or Hugging Face folder); see LLM.load."""
    return LLM.load(name_or_path, dtype=dtype, threads=threads, quiet=quiet)
