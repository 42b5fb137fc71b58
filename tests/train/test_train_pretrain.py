"""Pretraining a tiny model: the loss falls far below chance, the run folder loads and generates."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

import llmos
from llmos.errors import LlmosError
from llmos.train.loop import TrainConfig, lr_factor, make_optimizer
from llmos.train.presets import PRESETS, model_config
from llmos.train.run import pretrain
from llmos.weights.load import build_model


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, corpus_dir, tokenizer_file, tiny):
    run = tmp_path_factory.mktemp("runs") / "tiny"
    cfg = TrainConfig(steps=200, batch_size=8, seq_len=64, lr=3e-3, warmup=20, eval_every=100, save_every=100,
                      log_every=25)
    pretrain([corpus_dir], run, tokenizer=tokenizer_file, model_overrides=tiny, cfg=cfg, progress=False)
    return run


def test_validation_loss_falls_far_below_uniform(tiny_run):
    rows = list(csv.DictReader(open(tiny_run / "log.csv")))
    val = [float(r["val_loss"]) for r in rows if r["val_loss"]]
    uniform = math.log(512)  # ln(vocab): a model that knows nothing
    assert len(val) == 2  # steps 100, 200
    assert val[-1] < 0.3 * uniform, val
    assert val[-1] < val[0]
    assert int(rows[-1]["step"]) == 200 and float(rows[-1]["tok_per_s"]) > 0
    assert json.loads((tiny_run / "log.jsonl").read_text().splitlines()[-1])["step"] == 200
    assert (tiny_run / "loss.png").stat().st_size > 1000


def test_run_folder_is_a_model_llmos_loads_and_generates_from(tiny_run):
    recipe = json.loads((tiny_run / "run.json").read_text())
    assert recipe["finished"] and recipe["final"]["step"] == 200
    llm = llmos.load(str(tiny_run), dtype="fp32")
    assert llm.config.dim == 64 and llm.config.n_layers == 2 and llm.config.vocab_size == 512
    text = llm.generate("The cat", max_new_tokens=12, temperature=0)
    words = set(" ".join(general for general in text.split()).replace(".", " ").lower().split())
    # Trained on a 40-word grammar: greedy text is made of its words.
    known = {"the", "cat", "a", "dog", "old", "man", "my", "sister", "teacher", "small", "bird", "farmer", "our",
             "neighbor", "sees", "likes", "finds", "helps", "watches", "follows", "paints", "calls", "red", "ball",
             "green", "tree", "river", "an", "apple", "house", "yellow", "flower", "sky", "market", "every",
             "morning", "in", "park", "after", "dinner", "with", "smile", "near", "school", "on", "sunday"}
    assert words and words <= known, text


def test_checkpoints_are_complete_and_pruned(tiny_run):
    from llmos.train import checkpoint

    done = checkpoint.complete(tiny_run)
    assert [p.name for p in done] == ["step-00000100", "step-00000200"]
    tensors, state = checkpoint.load(done[-1])
    assert state["step"] == 200 and state["data_pos"] == 200 * 8
    assert set(tensors) == {"model.safetensors", "optimizer.safetensors"}


def test_fresh_start_refuses_an_existing_run(tiny_run, corpus_dir):
    with pytest.raises(LlmosError, match="--resume"):
        pretrain([corpus_dir], tiny_run, cfg=TrainConfig(steps=1), progress=False)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(steps=100, warmup=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(55, cfg) == pytest.approx(0.55)
    assert lr_factor(100, cfg) == pytest.approx(0.1)
    assert all(lr_factor(s, cfg) >= lr_factor(s + 1, cfg) for s in range(10, 100))


def test_weight_decay_only_on_matrices(tiny):
    config = model_config("tiny", "gpt2", 300, **tiny)
    model = build_model(config, "cpu")
    model.tie_weights()
    opt, names = make_optimizer(model, TrainConfig(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert "layers.0.ln_1.bias" in names and "output.weight" not in names  # tied head counted once
    assert len(names) == len({id(p) for p in model.parameters()})


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_presets_build_with_the_engine_model_files(arch):
    for size in PRESETS:
        config = model_config(size, arch, 4096)
        assert config.arch == arch and config.tie_embeddings
        model = build_model(config)  # meta device: no memory
        n = sum(p.numel() for p in model.parameters())
        assert n > 0
    with pytest.raises(LlmosError, match="unknown size"):
        model_config("huge", arch, 4096)


def test_bf16_autocast_trains(tmp_path, corpus_dir, tokenizer_file, tiny):
    cfg = TrainConfig(steps=4, batch_size=2, seq_len=32, dtype="bf16", eval_every=4, save_every=4, warmup=1)
    run = pretrain([corpus_dir], tmp_path / "bf16", tokenizer=tokenizer_file, model_overrides=tiny, cfg=cfg,
                   progress=False)
    final = json.loads((run / "run.json").read_text())["final"]
    assert math.isfinite(final["val_loss"])
    # Autocast changes the matmuls, not the stored weights.
    from safetensors.torch import load_file

    assert all(t.dtype == torch.float32 for t in load_file(str(run / "model.safetensors")).values())
