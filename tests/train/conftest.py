"""Fixtures for the training tests: small generated corpora, a trained tokenizer, tiny models.

The corpora are generated from a fixed seed: a general one (simple English sentences from a small
grammar, so a tiny model learns it in a few hundred steps), a domain one (maintenance notes about an
invented plant, which a general model has never seen) with a held-out part, and chat JSONL.
Tiny models are dim 64, 2 layers, sequences of 64 tokens.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

TINY = {"dim": 64, "n_layers": 2, "n_heads": 4, "max_seq_len": 128}

_SUBJ = ["the cat", "a dog", "the old man", "my sister", "the teacher", "a small bird", "the farmer", "our neighbor"]
_VERB = ["sees", "likes", "finds", "helps", "watches", "follows", "paints", "calls"]
_OBJ = ["the red ball", "a green tree", "the river", "an apple", "the house", "a yellow flower", "the sky", "the market"]
_TAIL = ["every morning", "in the park", "after dinner", "with a smile", "near the school", "on sunday"]


def general_lines(n: int, seed: int = 0) -> list[str]:
    r = random.Random(seed)
    return [f"{r.choice(_SUBJ).capitalize()} {r.choice(_VERB)} {r.choice(_OBJ)} {r.choice(_TAIL)}." for _ in range(n)]


def domain_lines(n: int, seed: int = 1) -> list[str]:
    r = random.Random(seed)
    parts = ["valve V-{n}", "pump P-{n}", "sensor T-{n}", "heat exchanger E-{n}"]
    acts = ["is inspected every {d} days", "must be flushed before restart", "reports pressure to the control room",
            "is rated for {d} bar"]
    return [f"In the Zorblax plant, {r.choice(parts).format(n=r.randint(100, 130))} "
            f"{r.choice(acts).format(d=r.choice([7, 14, 30, 90]))}." for _ in range(n)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models train fastest on one thread, and a busy machine makes more threads much slower
    (OpenMP workers spin-waiting for a descheduled sibling). Restored for the rest of the suite."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """Two text files of general sentences (a folder, as users pass one)."""
    d = tmp_path_factory.mktemp("corpus")
    lines = general_lines(1600)
    (d / "part1.txt").write_text("\n".join(lines[:800]) + "\n")
    (d / "part2.md").write_text("\n".join(lines[800:]) + "\n")
    return d


@pytest.fixture(scope="session")
def domain_files(tmp_path_factory) -> tuple[Path, Path]:
    """(training text, held-out text) of the invented domain."""
    d = tmp_path_factory.mktemp("domain")
    lines = domain_lines(440)
    (d / "train.txt").write_text("\n".join(lines[:400]) + "\n")
    (d / "heldout.txt").write_text("\n".join(lines[400:]) + "\n")
    return d / "train.txt", d / "heldout.txt"


@pytest.fixture(scope="session")
def chat_jsonl(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("chat")
    r = random.Random(2)
    rows = []
    for _ in range(40):
        a, b = r.randint(1, 9), r.randint(1, 9)
        rows.append({"messages": [
            {"role": "system", "content": "You add numbers."},
            {"role": "user", "content": f"What is {a} plus {b}?"},
            {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
            {"role": "user", "content": "Thanks!"},
            {"role": "assistant", "content": "You are welcome."},
        ]})
    path = d / "chats.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return path


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory, corpus_dir, domain_files) -> Path:
    """A 512-token byte-level BPE trained on both corpora."""
    from llmos.train.bpe import train_tokenizer

    out = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer([corpus_dir, domain_files[0]], 512, out)
    return out


ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_llmos(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m llmos ARGS` with one thread, so runs in different processes compute alike."""
    env = {**os.environ, **ONE_THREAD}
    done = subprocess.run([sys.executable, "-m", "llmos", *args], capture_output=True, text=True, env=env, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"llmos {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done


@pytest.fixture(scope="session")
def llmos_cli():
    """run_llmos, for tests (conftest modules are not importable by name)."""
    return run_llmos


@pytest.fixture(scope="session")
def cli_env() -> dict[str, str]:
    """The environment run_llmos uses, for tests that start llmos themselves."""
    return {**os.environ, **ONE_THREAD}


@pytest.fixture(scope="session")
def tiny() -> dict[str, int]:
    """Model-shape overrides of the tiny test models."""
    return dict(TINY)
