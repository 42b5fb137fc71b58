"""Checkpoints: kill -9 at any moment, resume, and end with the weights of an uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from llmos.errors import LlmosError
from llmos.models.lora import LoraConfig
from llmos.train import checkpoint
from llmos.train.loop import TrainConfig
from llmos.train.run import finetune, pretrain, resume

STEPS = 300


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _pretrain_args(corpus_dir, tokenizer_file) -> list[str]:
    return [str(corpus_dir), "--tokenizer", str(tokenizer_file), "--dim", "64", "--layers", "2", "--heads", "4",
            "--context", "128", "--seq-len", "64", "--batch-size", "4", "--steps", str(STEPS), "--save-every", "10",
            "--eval-every", "100", "--lr", "3e-3", "--warmup", "10", "--quiet"]


def test_kill_9_mid_run_then_resume_matches_uninterrupted(tmp_path, corpus_dir, tokenizer_file, llmos_cli, cli_env):
    args = _pretrain_args(corpus_dir, tokenizer_file)
    full = tmp_path / "full"
    llmos_cli("pretrain", *args, "--out", str(full))

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "llmos", "pretrain", *args, "--out", str(killed)],
                            env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    # Kill as soon as the first checkpoint is complete: the process is then writing the next steps,
    # and perhaps the next checkpoint, at an arbitrary point.
    while checkpoint.latest(killed) is None:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    interrupted_at = json.loads((checkpoint.latest(killed) / "state.json").read_text())["step"]
    assert interrupted_at < STEPS and not (killed / "config.json").exists(), "the run finished before the kill"

    llmos_cli("pretrain", "--resume", str(killed))
    diff = _max_diff(load_file(str(full / "model.safetensors")), load_file(str(killed / "model.safetensors")))
    assert diff <= 1e-6, diff
    # The log reads as if nothing happened: same steps, same validation losses.
    rows = [json.loads(line) for line in (killed / "log.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (full / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [r["step"] for r in ref]
    assert [r.get("val_loss") for r in rows] == pytest.approx([r.get("val_loss") for r in ref], abs=1e-6)


def test_resume_restores_rng_for_lora_dropout(tmp_path, corpus_dir, domain_files, tokenizer_file, tiny, monkeypatch):
    base = pretrain([corpus_dir], tmp_path / "base", tokenizer=tokenizer_file, model_overrides=tiny, progress=False,
                    cfg=TrainConfig(steps=20, batch_size=4, seq_len=32, warmup=2, eval_every=20, save_every=20))
    cfg = TrainConfig(steps=24, batch_size=4, seq_len=32, lr=3e-3, warmup=2, eval_every=12, save_every=8)
    lora = LoraConfig(rank=4, alpha=8, dropout=0.2)  # dropout draws random numbers every step
    full = finetune(base, [domain_files[0]], tmp_path / "full", lora=lora, cfg=cfg, progress=False)

    real_save = checkpoint.save

    def save_then_crash(run, step, *a, **kw):  # an interruption right after the step-8 checkpoint
        out = real_save(run, step, *a, **kw)
        if step == 8:
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(checkpoint, "save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        finetune(base, [domain_files[0]], tmp_path / "cut", lora=lora, cfg=cfg, progress=False)
    monkeypatch.setattr(checkpoint, "save", real_save)
    resume(tmp_path / "cut", progress=False)
    a = load_file(str(full / "adapter.safetensors"))
    b = load_file(str(tmp_path / "cut" / "adapter.safetensors"))
    assert _max_diff(a, b) <= 1e-6


def test_incomplete_checkpoints_are_ignored(tmp_path):
    run = tmp_path / "run"
    t = {"model.safetensors": {"w": torch.ones(3)}}
    checkpoint.save(run, 10, t, {"step": 10})
    newest = checkpoint.save(run, 20, t, {"step": 20})
    assert checkpoint.latest(run) == newest
    # What kill -9 can leave: a marker-less folder, a truncated file, a half-built temp folder.
    (newest / checkpoint.MARKER).unlink()
    assert checkpoint.latest(run).name == "step-00000010"
    done = checkpoint.save(run, 30, t, {"step": 30}, keep=5)
    with open(done / "model.safetensors", "r+b") as f:
        f.truncate(10)
    (run / "checkpoints" / ".step-00000040.tmp-1").mkdir()
    assert checkpoint.latest(run).name == "step-00000010"
    # The next save clears the leftovers, and the older ones only once it is complete.
    checkpoint.save(run, 40, t, {"step": 40}, keep=1)
    assert [p.name for p in checkpoint.complete(run)] == ["step-00000040"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000040"]


def test_resume_without_a_complete_checkpoint_is_a_clear_error(tmp_path, corpus_dir, tokenizer_file, tiny):
    with pytest.raises(LlmosError, match="not a training run"):
        resume(tmp_path / "nothing-here")
    run = pretrain([corpus_dir], tmp_path / "run", tokenizer=tokenizer_file, model_overrides=tiny, progress=False,
                   cfg=TrainConfig(steps=2, batch_size=2, seq_len=32, warmup=1, eval_every=2, save_every=2))
    for folder in checkpoint.complete(run):
        (folder / checkpoint.MARKER).unlink()
    with pytest.raises(LlmosError, match="no complete checkpoint.*incomplete ones"):
        resume(run)
    shutil.rmtree(run / "checkpoints")
    with pytest.raises(LlmosError, match="no complete checkpoint.*none at all"):
        resume(run)
