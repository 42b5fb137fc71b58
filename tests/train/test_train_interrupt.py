"""Long jobs as a user meets them: an estimate up front, Ctrl-C saves and says how to resume, and the
waits before the first step (learning a tokenizer, tokenizing the corpus) show counted progress."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from llmos.train import checkpoint

STEPS = 400
ESTIMATE = re.compile(r"\d+ steps, ~[\d.]+ (ms|s|min|h)/step: about [\d.]+ (ms|s|min|h); Ctrl-C saves and stops")


def _args(corpus_dir, tokenizer_file) -> list[str]:
    # --save-every past the end: the only checkpoint before the end is the one Ctrl-C writes.
    return [str(corpus_dir), "--tokenizer", str(tokenizer_file), "--dim", "64", "--layers", "2", "--heads", "4",
            "--context", "128", "--seq-len", "64", "--batch-size", "4", "--steps", str(STEPS),
            "--save-every", "1000", "--eval-every", "1000", "--lr", "3e-3", "--warmup", "10"]


def _first_logged_step(run) -> bool:
    try:
        return bool((run / "log.jsonl").read_text().strip())
    except FileNotFoundError:
        return False


def test_ctrl_c_saves_prints_the_resume_command_and_resuming_matches(tmp_path, corpus_dir, tokenizer_file,
                                                                       llmos_cli, cli_env):
    args = _args(corpus_dir, tokenizer_file)
    run = tmp_path / "run"
    err_path = tmp_path / "stderr.txt"
    with open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "llmos", "pretrain", *args, "--out", str(run)],
                                env=cli_env, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 120
        while not _first_logged_step(run):  # a log row: training has started and steps are done
            assert proc.poll() is None, err_path.read_text()[-2000:]
            assert time.monotonic() < deadline, "no step was logged"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=120) == 130, err_path.read_text()[-2000:]
    stderr = err_path.read_text()
    assert ESTIMATE.search(stderr), stderr[-2000:]
    assert "Traceback" not in stderr

    saved = checkpoint.complete(run)
    assert len(saved) == 1, "Ctrl-C did not save (or the run reached a periodic checkpoint)"
    step = json.loads((saved[0] / "state.json").read_text())["step"]
    assert 10 <= step < STEPS and not (run / "config.json").exists()
    assert f"stopped at step {step}, saved in {saved[0]}" in stderr
    command = re.search(r"to continue:\n  (.+)\n", stderr).group(1)
    assert command == f"llmos pretrain --resume {shlex.quote(str(run))}"

    argv = shlex.split(command)
    resumed = subprocess.run([sys.executable, "-m", "llmos", *argv[1:]], env=cli_env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    full = tmp_path / "full"
    llmos_cli("pretrain", *args, "--quiet", "--out", str(full))
    a, b = load_file(str(full / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


@pytest.mark.parametrize("quiet", [False, True])
def test_tokenizer_and_tokenizing_show_counted_progress_unless_quiet(tmp_path, corpus_dir, llmos_cli, quiet):
    done = llmos_cli("pretrain", str(corpus_dir), "--vocab", "300", "--dim", "32", "--layers", "1", "--heads", "2",
                     "--context", "64", "--seq-len", "32", "--batch-size", "2", "--steps", "3",
                     "--out", str(tmp_path / "run"), *(["--quiet"] if quiet else []))
    size = sum(f.stat().st_size for f in corpus_dir.iterdir()) / 1024
    bars = [r"learning a 300-token tokenizer: 100%", r"tokenizing: 100%"]
    for bar in bars:
        # Counted in bytes of input, whether or not stderr is a terminal.
        found = re.search(bar + rf".*\| {size:.1f}k/{size:.1f}kB? ", done.stderr)
        assert bool(found) != quiet, done.stderr
    assert bool(ESTIMATE.search(done.stderr)) != quiet, done.stderr
