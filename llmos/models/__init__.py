"""Model files (one per family) and what they share."""

from __future__ import annotations

from torch import nn


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` in place of the submodule at the qualified `name` ("layers.3.attn.wqkv").

    Every swap (quantized forms, LoRA adapters) goes through here, and counts itself in
    `model.swaps`: a kernel that captured the model's layers (engine/native.py's decode step)
    compares the count and rebuilds when the layers changed."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
    model.swaps = model.__dict__.get("swaps", 0) + 1
