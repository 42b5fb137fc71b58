"""LoRA: low-rank adapters swapped into a model from outside its file.

`apply_lora(model, LoraConfig(...))` replaces each `nn.Linear` whose qualified name matches one of
the target patterns with a `LoRALinear` that keeps the original layer (frozen) and adds
`dropout(x) @ A.T @ B.T * alpha / rank`; every other parameter is frozen too. B starts at zero, so
the wrapped model computes exactly what it did before. `merge_lora` folds the product into the
base weights and puts plain `nn.Linear`s back; `lora_state_dict`/`load_lora_state_dict` and
`save_adapter`/`load_adapter` move only the adapter tensors.

Targets are fnmatch patterns matched against the module's full name (`layers.0.attn.wqkv`) and its
last part (`wqkv`). The model files fuse projections, so Hugging Face names are translated:
q_proj/k_proj/v_proj -> wqkv, gate_proj/up_proj -> w13, o_proj -> wo, down_proj -> w2 (c_attn,
c_proj, c_fc for GPT-2). An adapter on a fused `wqkv` is one LoRA over the concatenated q/k/v
outputs: A is shared by q, k and v, B has rows for each. A pattern that matches nothing is an error.
"""

from __future__ import annotations

import fnmatch
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from llmos.errors import LlmosError
from llmos.models import set_module

# Hugging Face / PEFT target names -> the fused llmos module that holds them.
HF_ALIASES: dict[str, str] = {
    "q_proj": "wqkv", "k_proj": "wqkv", "v_proj": "wqkv", "o_proj": "wo",
    "gate_proj": "w13", "up_proj": "w13", "down_proj": "w2",
    "qkv_proj": "wqkv", "gate_up_proj": "w13",  # Phi-3 stores these fused already
    "c_attn": "wqkv", "c_fc": "fc",  # GPT-2 Conv1D names; its c_proj is ambiguous (attn or mlp)
}
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": ("wqkv", "wo", "w13", "w2"),
    "gpt2": ("wqkv", "wo", "fc", "proj"),
}
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
RUN_FILE = "run.json"  # a training run's recipe (llmos.train.run); a LoRA run's names its base model


def is_adapter_run(path: str | Path) -> bool:
    """A finished LoRA run that holds its adapter and no weights of its own (loading needs its base).
    Here, below the store, so the store can recognise one without importing the training code."""
    path = Path(path)
    return (path / RUN_FILE).is_file() and (path / ADAPTER_WEIGHTS).is_file() and not (path / "config.json").is_file()


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = field(default=())  # () means the family's DEFAULT_TARGETS

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise LlmosError(f"LoRA rank must be positive, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise LlmosError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (targets as a list); `from_dict` reads them back."""
        return {**asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoraConfig:
        return cls(rank=int(d["rank"]), alpha=float(d["alpha"]), dropout=float(d["dropout"]),
                   targets=tuple(d.get("targets") or ()))


class LoRALinear(nn.Module):
    """`base(x) + dropout(x) @ A.T @ B.T * scale`, with `base` frozen."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.base = base
        self.rank, self.scale = rank, alpha / rank
        device, dtype = base.weight.device, base.weight.dtype
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=device, dtype=dtype))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=device, dtype=dtype))
        # PEFT's init: A like nn.Linear's default, B zero, so training starts from the base model.
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def delta(self) -> torch.Tensor:
        """The low-rank update (out, in) that merging adds to the base weight."""
        return (self.lora_b @ self.lora_a) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Two thin matmuls instead of materialising B @ A: (.., in) -> (.., r) -> (.., out).
        return self.base(x) + (self.dropout(x) @ self.lora_a.t() @ self.lora_b.t()) * self.scale


def _patterns(targets: Sequence[str]) -> list[str]:
    return [HF_ALIASES.get(t, t) for t in targets]


def _matches(name: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name.rsplit(".", 1)[-1], pattern)


def apply_lora(model: nn.Module, config: LoraConfig, arch: str | None = None) -> list[str]:
    """Wrap the matching linear layers in place; freeze everything else. Returns the wrapped names.

    The vocabulary head (`output`) is only wrapped when a pattern names it explicitly.
    """
    arch = arch or getattr(getattr(model, "config", None), "arch", "llama")
    targets = config.targets or DEFAULT_TARGETS.get(arch, DEFAULT_TARGETS["llama"])
    patterns = _patterns(targets)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    chosen: list[str] = []
    for pattern, original in zip(patterns, targets):
        hits = [n for n in linears if _matches(n, pattern) and (n != "output" or pattern == "output")]
        if not hits:
            sample = sorted({n.rsplit(".", 1)[-1] for n in linears})
            raise LlmosError(
                f"LoRA target {original!r} matches no linear layer of this {arch} model; "
                f"layer names are {', '.join(sample)} (patterns may use * and full names like layers.0.attn.wqkv)"
            )
        chosen += [n for n in hits if n not in chosen]
    for p in model.parameters():
        p.requires_grad_(False)
    for name in chosen:
        set_module(model, name, LoRALinear(linears[name], config.rank, config.alpha, config.dropout))
    return chosen


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain nn.Linear back (in place)."""
    for name, module in lora_modules(model).items():
        base = module.base
        base.weight.add_(module.delta().to(base.weight.dtype))
        set_module(model, name, base)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, by the name of the layer they adapt (`layers.0.attn.wqkv.lora_a`)."""
    out = {}
    for name, module in lora_modules(model).items():
        out[f"{name}.lora_a"] = module.lora_a.detach()
        out[f"{name}.lora_b"] = module.lora_b.detach()
    return out


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    modules = lora_modules(model)
    expected = {f"{n}.{part}" for n in modules for part in ("lora_a", "lora_b")}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
        raise LlmosError(f"adapter does not fit this model: missing {missing}, unexpected {extra}")
    for name, module in modules.items():
        for part in ("lora_a", "lora_b"):
            target = getattr(module, part)
            value = state[f"{name}.{part}"]
            if value.shape != target.shape:
                raise LlmosError(f"adapter tensor {name}.{part} has shape {tuple(value.shape)}, the model wants {tuple(target.shape)}")
            target.copy_(value)


def save_adapter(model: nn.Module, folder: str | Path, config: LoraConfig, base: str = "") -> None:
    """Write adapter.safetensors + adapter_config.json into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous().cpu() for k, v in lora_state_dict(model).items()}
    save_file(tensors, str(folder / ADAPTER_WEIGHTS))
    meta = {**config.to_dict(), "modules": sorted(lora_modules(model)), "base_model": base}
    (folder / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2))


def read_adapter_config(folder: str | Path) -> LoraConfig:
    path = Path(folder) / ADAPTER_CONFIG
    try:
        meta = json.loads(path.read_text())
        return LoraConfig.from_dict({**meta, "targets": meta.get("modules") or meta.get("targets")})
    except (OSError, ValueError, KeyError) as exc:
        raise LlmosError(f"cannot read LoRA adapter config {path}: {exc}") from exc


def load_adapter(model: nn.Module, folder: str | Path, arch: str | None = None) -> nn.Module:
    """Wrap `model` with the adapter saved in `folder` (unmerged; call merge_lora to fold it)."""
    apply_lora(model, read_adapter_config(folder), arch)
    load_lora_state_dict(model, load_file(str(Path(folder) / ADAPTER_WEIGHTS)))
    return model


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as if merged (plain names, base + delta), leaving `model` untouched."""
    loras = lora_modules(model)
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if leaf in ("lora_a", "lora_b") and owner in loras:
            continue
        if owner.endswith(".base") and owner[: -len(".base")] in loras:
            owner = owner[: -len(".base")]
            key = f"{owner}.{leaf}"
            if leaf == "weight":
                value = value + loras[owner].delta().to(value.dtype)
        out[key] = value
    return out
