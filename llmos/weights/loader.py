"""One way from a model reference to a model in memory.

    model, config, tokenizer = load_model("smollm2-135m-instruct", "int4", kernels=native.kernels())

A reference is a store name (resolved by the store, never downloaded here), a GGUF file, a Hugging
Face folder, or a LoRA run (an adapter beside a run.json that names its base); `store.kind_of` tells
them apart. `load_model`, `read_config` and `read_tokenizer` are the only ways the
rest of llmos opens a model (llmos.load, the quality measurement, training and evaluation, the
embedding task, the translation task's language check).

Forms (`load_model(ref, form)`): "fp32" keeps the checkpoint's weights (memory-mapped, dequantized
from GGUF); "bf16", "int8" and "int4" build each Linear in that form as it loads (quant.linear_hook),
and keep the converted model in the store (weights/converted.py, keyed by the model's content), so
a later load only maps a file. "gguf" (a GGUF file only) is the file's own form: every Linear and the
token table whose blocks the kernels run (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K) become
gguf_linear layers over views of the file's memory map, nothing of them dequantized or converted (so
nothing is cached: the map is the model; its views keep it open as long as the model lives); F32
tensors are the map's own, and a weight of another type (F16, Q3_K, IQ*) loads dequantized to fp32,
with a warning that names it. The KV cache dtype that goes with a form is `kv_dtype(form)`, for
the caller to pass to the engine. `kernels` (models/kernels.py) are installed on the model;
`owned=True` gives an fp32 model whose tensors own their memory (training writes into them).
A BERT-family encoder loads in "fp32" or "bf16" (its weights' dtype).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmos import derived, gguf_linear, quant, store
from llmos.config import ModelConfig
from llmos.errors import LlmosError
from llmos.models.kernels import PYTORCH, Kernels, install
from llmos.models.lora import ADAPTER_WEIGHTS, RUN_FILE, load_adapter, merge_lora
from llmos.tokenizer import Tokenizer, derives_merges
from llmos.weights import converted
from llmos.weights.gguf import GGUFFile
from llmos.weights.dequant import type_name
from llmos.weights.load import load_bert, load_gguf, load_hf, open_gguf_config, read_hf_config

FORMS = (*quant.FORMS, "gguf")


def resolve(ref: str | Path) -> Path:
    """The path of a reference: a store name's files, or the path itself (checked to exist)."""
    return store.resolve(str(ref))


def kv_dtype(form: str) -> torch.dtype | None:
    """The KV cache dtype for a weight form: fp16 for the quantized forms (half the bytes a decode
    step reads per cached position, far below their weights' rounding), None (the weights') for fp32."""
    return None if form == "fp32" else torch.float16


# --- without weights ------------------------------------------------------------------------------

def read_recipe(run: str | Path) -> dict[str, Any]:
    """A training run's run.json (llmos.train.run writes it)."""
    path = Path(run) / RUN_FILE
    if not path.is_file():
        raise LlmosError(f"{run} is not a training run (no {RUN_FILE}); give the --out folder of a pretrain or finetune")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise LlmosError(f"{path} is damaged ({exc})") from None


def read_config(ref: str | Path) -> ModelConfig:
    """The ModelConfig of a reference (no weights read)."""
    path = resolve(ref)
    kind = store.kind_of(path)
    if kind == "gguf":
        with GGUFFile(path) as gguf:
            return open_gguf_config(gguf)
    if kind == "adapter_run":
        return ModelConfig(**read_recipe(path)["model"])
    return read_hf_config(path)


def read_tokenizer(ref: str | Path) -> Tokenizer:
    """The tokenizer of a reference (no weights read): from a GGUF file's metadata, or the folder's
    tokenizer.json (a LoRA run keeps its base's beside the adapter)."""
    path = resolve(ref)
    if store.kind_of(path) == "gguf":
        with GGUFFile(path) as gguf:
            return _gguf_tokenizer(path, gguf)
    return Tokenizer.from_dir(path)


def _gguf_tokenizer(path: Path, gguf: GGUFFile) -> Tokenizer:
    """The tokenizer in a GGUF file's metadata; merges it has to derive (Gemma) are cached in the store."""
    cache = None
    if derives_merges(gguf.metadata):
        try:
            cache = derived.merges_file(path)
        except (OSError, LlmosError):  # a store llmos cannot use or write: derive them every time
            pass
    return Tokenizer.from_gguf(gguf.metadata, merges_cache=cache)


def adapter_run_config(run: str | Path) -> tuple[ModelConfig, Tokenizer]:
    """(config, tokenizer) of a LoRA run, after checking that its base is there and unchanged."""
    run = Path(run)
    recipe = read_recipe(run)
    base = Path(recipe["base"])
    if not base.exists():
        raise LlmosError(f"{run} is a LoRA adapter on {recipe.get('base_name') or base}, which is no longer at "
                         f"{base}; put the base model back to load or export the run")
    want = recipe.get("base_sha256")
    if want and derived.content_key(base) != want:
        raise LlmosError(f"{run} is a LoRA adapter on {base}, whose weights have changed since the run trained on "
                         f"them (sha256 {want}...); put the original base back to load or export the run")
    return ModelConfig(**recipe["model"]), Tokenizer.from_dir(run)


# --- with weights ---------------------------------------------------------------------------------

def load_model(ref: str | Path, form: str = "fp32", *, kernels: Kernels = PYTORCH, use_cache: bool = True,
               owned: bool = False) -> tuple[nn.Module, ModelConfig, Tokenizer]:
    """Model, config and tokenizer of a reference, its linears in `form` (see the module header).
    `use_cache=False` converts afresh and keeps nothing (the quality measurement)."""
    if form not in FORMS:
        raise LlmosError(f"dtype must be one of {', '.join(FORMS)} (or auto), got {form!r}")
    if owned and form != "fp32":
        raise LlmosError(f"a model that owns its memory (for training) loads in fp32, not {form}")
    path = resolve(ref)
    kind = store.kind_of(path)
    if form == "gguf" and kind != "gguf":
        raise LlmosError(f"{path} is not a GGUF file: the gguf form runs a GGUF file's own blocks; "
                         f"load it in {', '.join(quant.FORMS)} (or auto)")
    config = read_hf_config(path) if kind == "hf" else None
    if config is not None and config.arch == "bert":
        return _encoder(path, config, form), config, Tokenizer.from_dir(path)
    cache = derived.converted_file(path, form) if form not in ("fp32", "gguf") and use_cache else None
    if kind == "adapter_run":
        model, config, tokenizer = _adapter_run(path, form, cache, owned)
    elif kind == "gguf":
        with GGUFFile(path) as gguf:
            config = open_gguf_config(gguf)
            tokenizer = _gguf_tokenizer(path, gguf)
            model = converted.load(cache, config) if cache else None
            if form == "gguf":
                model = _file_form(gguf, config)
            elif model is None:
                model = load_gguf(gguf, config, linear_hook=quant.linear_hook(form))
                if cache:
                    save_converted(model, cache)
    else:
        tokenizer = Tokenizer.from_dir(path)
        model = converted.load(cache, config) if cache else None
        if model is None:
            model = load_hf(path, config, linear_hook=quant.linear_hook(form))
            if cache:
                save_converted(model, cache)
    if owned and kind != "adapter_run":  # a run's base is loaded owned already, the adapter merged into it
        _own_memory(model)
    return install(model, kernels), config, tokenizer


def _file_form(gguf: GGUFFile, config: ModelConfig) -> nn.Module:
    """The "gguf" form: the file's blocks where the kernels run them, a warning naming the rest."""
    declined: list[tuple[str, list[int]]] = []
    model = load_gguf(gguf, config, blocks_hook=gguf_linear.blocks_hook(declined))
    quantized = [(name, types) for name, types in declined if any(t != 0 for t in types)]  # F32 is the file's own
    if quantized:
        kinds = sorted({type_name(t) for _, types in quantized for t in types if t not in gguf_linear.QTYPES})
        warnings.warn(f"{gguf.path}: {len(quantized)} weights ({quantized[0][0]}...) are stored as {', '.join(kinds)}, "
                      "which llmos has no kernel for; they run dequantized to fp32", stacklevel=3)
    return model


def save_converted(model: nn.Module, file: Path) -> None:
    """Keep a converted model in the store: one converted copy per model, the form loaded last."""
    converted.save(model, file)
    derived.keep_only(file)


def _adapter_run(run: Path, form: str, cache: Path | None, owned: bool) -> tuple[nn.Module, ModelConfig, Tokenizer]:
    """A LoRA run: its base (checked unchanged) with the adapter merged in fp32, then converted like
    any model; the converted copy is keyed by the adapter's content."""
    config, tokenizer = adapter_run_config(run)
    model = converted.load(cache, config) if cache else None
    if model is None:
        model = quant.convert(_with_adapter(run, merge=True, owned=owned)[0], form)
        if cache:
            save_converted(model, cache)
    return model, config, tokenizer


def load_adapter_run(run: str | Path, *, merge: bool = False, owned: bool = False) -> tuple[nn.Module, ModelConfig, Tokenizer]:
    """A LoRA run's base (checked unchanged) in fp32 with its adapter: as adapter modules, or with
    `merge` folded into the base weights (plain nn.Linear layers again, as fast as the base)."""
    run = Path(run)
    _, tokenizer = adapter_run_config(run)
    return *_with_adapter(run, merge=merge, owned=owned), tokenizer


def _with_adapter(run: Path, *, merge: bool, owned: bool) -> tuple[nn.Module, ModelConfig]:
    """`load_adapter_run`'s model and config, once `adapter_run_config` has checked the base (a cold
    load of a converted run hashed a large base twice)."""
    if not (run / ADAPTER_WEIGHTS).is_file():
        raise LlmosError(f"{run} has no adapter (not a LoRA run, or merged with --merge)")
    model, config, _ = load_model(read_recipe(run)["base"], "fp32", owned=True)  # the adapter is merged into these tensors
    load_adapter(model, run, config.arch)
    if merge:
        merge_lora(model)
    if owned:
        for p in model.parameters():
            p.requires_grad_(True)
    return model.eval(), config


def _own_memory(model: nn.Module) -> None:
    """The loaders hand out memory-mapped tensors; training writes into them, so own the memory."""
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()
    model.tie_weights()


def _encoder(path: Path, config: ModelConfig, form: str) -> nn.Module:
    if form not in ("fp32", "bf16"):
        raise LlmosError(f"{path} is an encoder (BERT) model: it loads in fp32 or bf16, not {form}")
    return load_bert(path, config, torch.bfloat16 if form == "bf16" else torch.float32)
