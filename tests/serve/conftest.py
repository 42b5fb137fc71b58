"""Fixtures for the server tests: a tiny random Llama with the default model's tokenizer, and live
`llmos serve` subprocesses on free loopback ports (started once per session and shared)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

API_KEY = "test-key-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_tiny_model(folder: Path) -> Path:
    """A 2-layer Llama (d=64) with random weights, saved by transformers, and SmolLM2's tokenizer
    and chat template: it streams nonsense fast and rarely ends on its own."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmos.api import load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tok.backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": tok.backend.id_to_token(tok.bos_id), "eos_token": tok.backend.id_to_token(tok.eos_id),
        "chat_template": tok.chat_template}))
    return folder


class ServerProcess:
    """`python -m llmos serve ...` on a free port; `url`, `key`, `client()`, `stop()`."""

    def __init__(self, model: str, *extra: str, key: str | None = API_KEY, log: Path | None = None) -> None:
        self.port, self.key = free_port(), key
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "LLMOS_API_KEY": key or "", "PYTHONUNBUFFERED": "1"}
        self.log_path = log
        out = open(log, "wb") if log else subprocess.DEVNULL
        self.proc = subprocess.Popen([sys.executable, "-m", "llmos", "serve", "--model", model, "--port", str(self.port),
                                      "--threads", "1", *extra], env=env, stdout=out, stderr=subprocess.STDOUT)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=kw.pop("timeout", 120), **kw)

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llmos serve exited with {self.proc.returncode}: {self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"llmos serve did not become ready in {timeout} s: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path and self.log_path.exists() else ""

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@contextlib.contextmanager
def running(server: ServerProcess):
    """The server once ready; stopped afterwards, also when it never got ready."""
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def serve_running():
    return running


@pytest.fixture(autouse=True)
def one_torch_thread():
    """In-process model work on one thread (the servers get --threads 1): on a busy 2-core machine,
    torch's thread pool makes each small op wait on the other cores; restored after each test."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def serve_process() -> type[ServerProcess]:
    return ServerProcess


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, default_model_name) -> Path:  # its tokenizer comes from the default model
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_server(tiny_model, tmp_path_factory):
    """The tiny model behind an API key, with a 1 MiB body cap."""
    server = ServerProcess(str(tiny_model), "--dtype", "fp32", "--max-body-bytes", str(1 << 20),
                           log=tmp_path_factory.mktemp("logs") / "tiny.log")
    with running(server):
        yield server


@pytest.fixture(scope="session")
def default_server(default_model_name, tmp_path_factory):
    """The default chat model (and, lazily, the default embedding model) behind an API key."""
    from llmos import store

    store.pull(store.DEFAULT_EMBED_MODEL, quiet=True)
    server = ServerProcess(default_model_name, log=tmp_path_factory.mktemp("logs") / "default.log")
    with running(server):
        yield server
