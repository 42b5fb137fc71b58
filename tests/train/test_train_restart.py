"""A run killed before its first checkpoint can be started again: the folder counts as empty (and
--restart discards any run); --resume on it says so. A run with checkpoints is still protected."""

from __future__ import annotations

import json
import shutil

import pytest

from llmos.errors import LlmosError
from llmos.train import checkpoint
from llmos.train.loop import TrainConfig
from llmos.train.run import RUN_FILE, pretrain, resume

CFG = TrainConfig(steps=2, batch_size=2, seq_len=32, warmup=1, eval_every=2, save_every=2)


def killed_before_first_checkpoint(run) -> None:
    """What a kill leaves when it comes before the first save: the recipe, data, no checkpoint."""
    shutil.rmtree(run / "checkpoints")
    for name in ("config.json", "model.safetensors"):
        (run / name).unlink(missing_ok=True)
    recipe = json.loads((run / RUN_FILE).read_text())
    (run / RUN_FILE).write_text(json.dumps({**recipe, "finished": False}))


def test_a_run_killed_before_its_first_checkpoint_starts_again(tmp_path, corpus_dir, tokenizer_file, tiny):
    out = tmp_path / "run"
    pretrain([corpus_dir], out, tokenizer=tokenizer_file, model_overrides=tiny, progress=False, cfg=CFG)
    killed_before_first_checkpoint(out)
    with pytest.raises(LlmosError, match="--restart") as info:
        resume(out)
    assert "counts as empty" in str(info.value) and "\n" not in str(info.value)
    run = pretrain([corpus_dir], out, tokenizer=tokenizer_file, model_overrides=tiny, progress=False, cfg=CFG)
    assert checkpoint.latest(run) is not None and json.loads((run / RUN_FILE).read_text())["finished"]


def test_a_run_with_checkpoints_needs_restart(tmp_path, corpus_dir, tokenizer_file, tiny):
    out = tmp_path / "run"
    pretrain([corpus_dir], out, tokenizer=tokenizer_file, model_overrides=tiny, progress=False, cfg=CFG)
    with pytest.raises(LlmosError, match="--resume .*--restart"):
        pretrain([corpus_dir], out, tokenizer=tokenizer_file, model_overrides=tiny, progress=False, cfg=CFG)
    (out / "stale-marker").write_text("from the first run")
    run = pretrain([corpus_dir], out, tokenizer=tokenizer_file, model_overrides=tiny, progress=False, cfg=CFG,
                   restart=True)
    assert not (run / "stale-marker").exists() and checkpoint.latest(run) is not None


def test_restart_flag_in_the_cli(tmp_path, corpus_dir, tokenizer_file, llmos_cli):
    args = [str(corpus_dir), "--tokenizer", str(tokenizer_file), "--dim", "32", "--layers", "1", "--heads", "2",
            "--context", "64", "--seq-len", "32", "--batch-size", "2", "--steps", "2", "--save-every", "2", "--quiet",
            "--out", str(tmp_path / "run")]
    llmos_cli("pretrain", *args)
    again = llmos_cli("pretrain", *args, check=False)
    assert again.returncode == 1 and "--restart" in again.stderr
    llmos_cli("pretrain", *args, "--restart")
