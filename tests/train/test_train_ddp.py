"""torchrun: 2 processes (gloo) train to the weights 1 process reaches with the same global batch."""

from __future__ import annotations

import json
import subprocess
import sys

import torch.distributed as dist
from safetensors.torch import load_file

import pytest


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, corpus_dir, tokenizer_file, llmos_cli, cli_env):
    common = [str(corpus_dir), "--tokenizer", str(tokenizer_file), "--dim", "64", "--layers", "2", "--heads", "4",
              "--context", "128", "--seq-len", "32", "--steps", "12", "--lr", "3e-3", "--warmup", "3",
              "--eval-every", "6", "--save-every", "6", "--quiet", "--device", "cpu"]
    # Global batch 8 rows per step: 1 process x 4 rows x 2 accumulation steps ...
    one = tmp_path / "one"
    llmos_cli("pretrain", *common, "--batch-size", "4", "--grad-accum", "2", "--out", str(one))
    # ... or 2 processes x 2 rows x 2 accumulation steps, each reading its own rows.
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "llmos", "pretrain", *common, "--batch-size", "2", "--grad-accum", "2", "--out", str(two)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=cli_env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    a, b = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff <= 1e-5, diff
    # Rank 0 alone wrote the run; both logs agree on the losses (validation is split across ranks).
    log_one = [json.loads(x) for x in (one / "log.jsonl").read_text().splitlines()]
    log_two = [json.loads(x) for x in (two / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log_two] == [r["step"] for r in log_one]
    for r1, r2 in zip(log_one, log_two):
        assert r2["train_loss"] == pytest.approx(r1["train_loss"], abs=1e-5)
        if "val_loss" in r1:
            assert r2["val_loss"] == pytest.approx(r1["val_loss"], abs=1e-5)
    state = json.loads((two / "checkpoints" / "step-00000012" / "state.json").read_text())
    assert state["world_size"] == 2 and state["data_pos"] == 12 * 8
