"""llmos: run, adapt and serve open large language models on your own machine, offline.

    import llmos
    llm = llmos.load("smollm2-135m-instruct")     # or a .gguf file, or a Hugging Face folder
    print(llm.generate("LLMOS is a", max_new_tokens=50))

Attributes are imported lazily so `import llmos` (and `llmos --help`) stays fast.
"""

from __future__ import annotations

from typing import Any

from llmos.threads import choose_wait_policy

__version__ = "0.1.0"

choose_wait_policy()  # before torch loads OpenMP: see llmos/threads.py

_EXPORTS = {
    "load": "llmos.api",
    "LLM": "llmos.api",
    "Completion": "llmos.api",
    "LlmosError": "llmos.errors",
    "AutoTokenizer": "llmos.auto",
    "AutoModelForCausalLM": "llmos.auto",
    "TextStreamer": "llmos.auto",
    "pretrain": "llmos.train.run",
    "finetune": "llmos.train.run",
    "TrainConfig": "llmos.train.loop",
    "LoraConfig": "llmos.models.lora",
    "Index": "llmos.tasks.index",
    "Embedder": "llmos.tasks.embed",
    "ask": "llmos.tasks.qa",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'llmos' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
