"""Pretraining and fine-tuning runs: a folder that holds everything, resumable and loadable.

    RUN/run.json             the recipe: kind, data, model shape, training settings, base, LoRA
    RUN/tokenizer.json ...   the tokenizer (+ tokenizer_config.json, chat_template.jinja), from the start
    RUN/data/                token shards (train/data.py)
    RUN/checkpoints/         atomic checkpoints (train/checkpoint.py)
    RUN/log.csv, log.jsonl, loss.png
    RUN/config.json + model.safetensors     written when a pretraining, full or --merge run finishes:
                                            RUN is then a Hugging Face folder
    RUN/adapter.safetensors + adapter_config.json   written when a LoRA run (without --merge) finishes: the
                                            adapter alone (~8 MB for the default model, not a merged
                                            copy); run.json names the base (path, name, `base_sha256`)

`llmos.load(RUN)` and `llmos generate --model RUN` work on either: a LoRA run loads its base, checks
that the base's weights are still the ones it trained on, and merges the adapter into them at load
time (then any weight form, as for other models), so it decodes as fast as its base; `llmos export`
writes the merged weights.

`pretrain(data, out, size=..., arch=...)` trains a preset from scratch (training a byte-level BPE
tokenizer on the data first unless one is given); `finetune(base, data, out, lora=...)` trains a
store model, GGUF file or Hugging Face folder (dequantized to fp32), fully or with LoRA;
`resume(run)` continues either from its newest complete checkpoint. Starting a run again in a folder
that holds one is refused unless that run has no complete checkpoint and never finished (killed before
its first save: it counts as empty) or `restart=True` discards it. Under torchrun every rank calls
the same function; rank 0 prepares data and writes files, the others read them, so on several
machines the run folder must be on a shared filesystem. `load_model(ref)` loads a run (finished, or
from its newest checkpoint) or any model reference for evaluation and export.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmos import derived, store
from llmos.config import ModelConfig
from llmos.errors import LlmosError
from llmos.files import write_atomically
from llmos.models.lora import RUN_FILE, LoraConfig, apply_lora, is_adapter_run, merge_lora, save_adapter
from llmos.tokenizer import Tokenizer
from llmos.train import checkpoint, distributed
from llmos.train.bpe import load_tokenizer, train_tokenizer
from llmos.train.data import Shards, Windows, list_files, prepare_data
from llmos.train.loop import TrainConfig, train
from llmos.train.presets import init_weights, model_config
from llmos.weights import loader
from llmos.weights.export import save_hf, save_tokenizer
from llmos.weights.load import build_model
from llmos.weights.loader import adapter_run_config, read_recipe

__all__ = ["Loaded", "adapter_run_config", "base_config", "finetune", "is_run", "load_adapter_run", "load_base",
           "load_for_training", "load_model", "load_run", "pretrain", "read_recipe", "resume"]



@dataclass
class Loaded:
    model: nn.Module
    tokenizer: Tokenizer
    config: ModelConfig
    name: str


# --- entry points -------------------------------------------------------------------------------

def pretrain(
    data: list[str | Path],
    out: str | Path,
    *,
    size: str = "tiny",
    arch: str = "llama",
    tokenizer: str | Path | None = None,
    vocab_size: int = 4096,
    model_overrides: dict[str, Any] | None = None,
    cfg: TrainConfig | None = None,
    device: str = "auto",
    progress: bool = True,
    restart: bool = False,
) -> Path:
    """Train a `size` model in `arch` shape from scratch on `data`; returns the run folder.
    `restart`: discard a run already in `out` (see the module docstring)."""
    cfg = cfg or TrainConfig()
    recipe = {"kind": "pretrain", "data": _abs(data), "size": size, "arch": arch, "train": asdict(cfg),
              "tokenizer": str(tokenizer) if tokenizer else None, "vocab_size": vocab_size,
              "model_overrides": model_overrides or {}}
    return _execute(Path(out), recipe, resume=False, device=device, progress=progress, restart=restart)


def finetune(
    base: str | Path,
    data: list[str | Path],
    out: str | Path,
    *,
    lora: LoraConfig | None = None,
    merge: bool = False,
    cfg: TrainConfig | None = None,
    device: str = "auto",
    progress: bool = True,
    restart: bool = False,
) -> Path:
    """Fine-tune `base` on `data` (all weights, or a LoRA adapter); returns the run folder.
    `restart`: discard a run already in `out` (see the module docstring)."""
    base_path = store.resolve(str(base))
    if cfg is None:
        context = base_config(base_path).max_seq_len
        cfg = TrainConfig(lr=2e-4 if lora else 3e-5, steps=200, warmup=10, seq_len=min(256, context))
    recipe = {"kind": "finetune", "data": _abs(data), "base": str(base_path), "base_name": str(base),
              "train": asdict(cfg), "lora": lora.to_dict() if lora else None, "merge": merge}
    if lora and not merge:  # the run will hold the adapter alone: loading it needs this very base
        recipe["base_sha256"] = derived.content_key(base_path)
    return _execute(Path(out), recipe, resume=False, device=device, progress=progress, restart=restart)


def resume(run: str | Path, *, steps: int | None = None, device: str = "auto", progress: bool = True) -> Path:
    """Continue `run` from its newest complete checkpoint (to `steps`, if given, else the recipe's)."""
    run = Path(run)
    recipe = read_recipe(run)
    checkpoint.require_latest(run)
    if steps is not None:
        recipe["train"]["steps"] = steps
    return _execute(run, recipe, resume=True, device=device, progress=progress)


def _never_saved(run: Path) -> bool:
    """A run killed before its first complete checkpoint (and never finished): it counts as empty."""
    try:
        finished = bool(read_recipe(run).get("finished"))
    except LlmosError:  # a run.json cut short by the kill
        finished = False
    return not finished and checkpoint.latest(run) is None


# --- the run ------------------------------------------------------------------------------------

def _abs(paths: list[str | Path]) -> list[str]:
    if isinstance(paths, (str, Path)):
        paths = [paths]
    list_files(paths)  # fail early, naming the path, before any folder is made
    return [str(Path(p).resolve()) for p in paths]


def _write_json(path: Path, data: dict[str, Any]) -> None:
    write_atomically(path, json.dumps(data, indent=2))


def _execute(run: Path, recipe: dict[str, Any], *, resume: bool, device: str, progress: bool,
             restart: bool = False) -> Path:
    world = distributed.init(device)
    created = not resume and world.main and not run.exists()
    try:
        cfg = TrainConfig.from_dict(recipe["train"])
        try:
            failure: Exception | None = None
            if world.main:
                try:
                    _prepare(run, recipe, cfg, resume, progress, restart)
                except Exception as exc:
                    failure = exc
            if not distributed.all_ok(failure is None):
                raise failure or LlmosError("rank 0 could not prepare the run; its error says why")
            recipe = read_recipe(run) if not resume else recipe
            tokenizer = Tokenizer.from_dir(run)
            shards = Shards.open(run / "data")
            model, config = _build(recipe, cfg)
            if cfg.seq_len > config.max_seq_len:
                raise LlmosError(f"--seq-len {cfg.seq_len} is longer than the model's context ({config.max_seq_len})")
            train_w = Windows(shards.tokens("train"), shards.mask("train"), cfg.seq_len, cfg.seed)
            val_w = Windows(shards.tokens("val"), shards.mask("val"), cfg.seq_len, cfg.seed)
        except BaseException:
            # Bad data or settings found, or Ctrl-C, before the first step: leave no half-made run
            # behind that a corrected command would refuse to overwrite.
            if created:
                shutil.rmtree(run, ignore_errors=True)
            raise
        start = checkpoint.require_latest(run) if resume else None
        extra = {"kind": recipe["kind"]}
        metrics = train(model, train_w, val_w, cfg, run, world, resume_from=start, progress=progress, extra_state=extra)
        if world.main:
            _finish(run, recipe, model, config, tokenizer, metrics)
        distributed.barrier()
    finally:
        distributed.shutdown()
    return run


def _prepare(run: Path, recipe: dict[str, Any], cfg: TrainConfig, resume: bool, progress: bool,
             restart: bool = False) -> None:
    """Rank 0: recipe, tokenizer and token shards in the run folder."""
    if not resume:
        if (run / RUN_FILE).exists():
            if not (restart or _never_saved(run)):
                raise LlmosError(f"{run} already holds a run (with checkpoints, or finished); continue it with "
                                 f"--resume {run}, start it over with --restart (its checkpoints are deleted), "
                                 "or choose another --out")
            shutil.rmtree(run)  # a run folder llmos made (it has run.json): nothing in it is kept
        run.mkdir(parents=True, exist_ok=True)
        tokenizer, config = _first_tokenizer(recipe, progress)
        save_tokenizer(tokenizer, run, config.max_seq_len)
        recipe["model"] = asdict(config)
        recipe["finished"] = False
        _write_json(run / RUN_FILE, recipe)
    else:
        _write_json(run / RUN_FILE, {**recipe, "finished": False})
        if (run / "data" / "meta.json").is_file():
            return  # the run's data is fixed at its start, even if the source files changed since
    tokenizer = Tokenizer.from_dir(run)
    prepare_data(recipe["data"], tokenizer, run / "data", val_fraction=cfg.val_fraction, seed=cfg.seed,
                 min_tokens=cfg.seq_len + 1, progress=progress)


def _first_tokenizer(recipe: dict[str, Any], progress: bool) -> tuple[Tokenizer, ModelConfig]:
    """The run's tokenizer (the base's, the given one, or one trained on the data) and model shape."""
    if recipe["kind"] == "finetune":
        return _base_tokenizer_and_config(recipe["base"])
    if recipe.get("tokenizer"):
        tokenizer = load_tokenizer(recipe["tokenizer"])
    else:
        tokenizer = train_tokenizer(recipe["data"], recipe["vocab_size"], progress=progress)
    config = model_config(recipe["size"], recipe["arch"], tokenizer.vocab_size, **recipe["model_overrides"])
    return tokenizer, config


def base_config(base: str | Path) -> ModelConfig:
    """The ModelConfig of a store name, GGUF file, Hugging Face folder or LoRA run (no weights read)."""
    return loader.read_config(base)


def _base_tokenizer_and_config(base: str) -> tuple[Tokenizer, ModelConfig]:
    return loader.read_tokenizer(base), loader.read_config(base)


def load_for_training(base: str | Path) -> tuple[nn.Module, ModelConfig]:
    """A GGUF file, Hugging Face folder or LoRA run (merged) as an fp32 model that owns its memory."""
    if not Path(base).exists():
        raise LlmosError(f"the base model of this run, {base}, is gone; put it back to resume, load or export the run")
    model, config, _ = loader.load_model(base, "fp32", owned=True)
    return model, config


def _build(recipe: dict[str, Any], cfg: TrainConfig) -> tuple[nn.Module, ModelConfig]:
    """The model a run trains, before any checkpoint is applied (same on every rank)."""
    if recipe["kind"] == "pretrain":
        config = ModelConfig(**recipe["model"])
        torch.manual_seed(cfg.seed)
        model = build_model(config, "cpu")
        init_weights(model, config.n_layers)
        model.tie_weights()
        return model, config
    model, config = load_for_training(recipe["base"])
    if recipe.get("lora"):
        torch.manual_seed(cfg.seed)
        apply_lora(model, LoraConfig.from_dict(recipe["lora"]), config.arch)
    return model, config


def _finish(run: Path, recipe: dict[str, Any], model: nn.Module, config: ModelConfig, tokenizer: Tokenizer,
            metrics: dict[str, Any]) -> None:
    """Rank 0: a LoRA run keeps its adapter alone (it names its base); any other run becomes a
    Hugging Face model folder."""
    model = model.cpu()
    lora = recipe.get("lora")
    if lora and not recipe.get("merge"):
        save_adapter(model, run, LoraConfig.from_dict(lora), base=recipe.get("base_name", ""))
    else:
        if lora:
            merge_lora(model)
        save_hf(model, config, tokenizer, run)
    _write_json(run / RUN_FILE, {**recipe, "finished": True, "final": metrics})


# --- loading runs and models --------------------------------------------------------------------

def is_run(path: str | Path) -> bool:
    return (Path(path) / RUN_FILE).is_file()


def load_run(run: str | Path) -> Loaded:
    """A run's model: the finished Hugging Face folder, else its newest complete checkpoint."""
    run = Path(run)
    recipe = read_recipe(run)
    if recipe.get("finished") and is_adapter_run(run):
        return load_adapter_run(run, merge=True)
    if recipe.get("finished") and (run / "config.json").is_file() and (run / "model.safetensors").is_file():
        model, config, tokenizer = loader.load_model(run, "fp32")  # a finished run is a Hugging Face folder
        return Loaded(model, tokenizer, config, str(run))
    tokenizer = Tokenizer.from_dir(run)
    folder = checkpoint.require_latest(run)
    tensors, _ = checkpoint.load(folder)
    model, config = _build(recipe, TrainConfig.from_dict(recipe["train"]))
    saved = tensors["model.safetensors"]
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(saved) != set(params):
        raise LlmosError(f"{folder} does not match the run's model")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])
    return Loaded(model.eval(), tokenizer, config, f"{run} ({folder.name})")


def load_base(run: str | Path) -> Loaded | None:
    """The model a fine-tuning run started from (None for pretraining runs)."""
    recipe = read_recipe(run)
    if recipe["kind"] != "finetune":
        return None
    model, config = load_for_training(recipe["base"])
    tokenizer, _ = _base_tokenizer_and_config(recipe["base"])
    return Loaded(model.eval(), tokenizer, config, recipe.get("base_name") or recipe["base"])


def load_model(ref: str | Path) -> Loaded:
    """A run folder, or any model llmos runs (store name, GGUF file, Hugging Face folder), in fp32."""
    if is_run(ref):
        return load_run(ref)
    path = store.resolve(str(ref))
    model, config = load_for_training(str(path))
    tokenizer, _ = _base_tokenizer_and_config(str(path))
    return Loaded(model.eval(), tokenizer, config, str(ref))


def load_adapter_run(run: str | Path, *, merge: bool = False) -> Loaded:
    """A LoRA run's base (checked unchanged) with its adapter: as adapter modules, or with `merge`
    folded into the base weights (plain nn.Linear layers again, as fast as the base)."""
    model, config, tokenizer = loader.load_adapter_run(run, merge=merge)
    return Loaded(model, tokenizer, config, str(run) if merge else f"{run} (adapter)")
