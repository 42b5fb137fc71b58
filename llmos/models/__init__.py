"""Model files (one per family) and what they share."""

from __future__ import annotations

from torch import nn


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` in place of the submodule at the qualified `name` ("layers.3.attn.wqkv")."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
