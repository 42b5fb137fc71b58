"""Model sizes for pretraining from scratch, in Llama or GPT-2 shape, run by the same model files.

| preset | dim | layers | heads (kv) | context | parameters in the blocks, Llama / GPT-2 shape |
|--------|-----|--------|------------|---------|-----------------------------------------------|
| tiny   | 128 | 4      | 4 (2)      | 256     | 0.74 M / 0.79 M: recognizable text in minutes on 2 CPU cores |
| small  | 256 | 6      | 8 (4)      | 512     | 4.4 M / 4.7 M |
| medium | 512 | 8      | 8 (4)      | 1024    | 23 M / 25 M |
| large  | 768 | 12     | 12 (4)     | 1024    | 76 M / 85 M (GPT-2 small's width and depth) |

Embeddings add vocab x dim (0.5 M for tiny at a 4,096-token vocabulary).

GPT-2 shape uses all heads for keys/values and a 4x GELU MLP; Llama shape uses grouped-query
attention and a SwiGLU MLP of about 8/3 x dim (rounded to 32). Embeddings are tied. Any field can be
overridden (`dim=64, n_layers=2`); a new dim re-derives the MLP width unless it is given too.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from llmos.config import ModelConfig
from llmos.errors import LlmosError

PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"dim": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 256},
    "small": {"dim": 256, "n_layers": 6, "n_heads": 8, "n_kv_heads": 4, "max_seq_len": 512},
    "medium": {"dim": 512, "n_layers": 8, "n_heads": 8, "n_kv_heads": 4, "max_seq_len": 1024},
    "large": {"dim": 768, "n_layers": 12, "n_heads": 12, "n_kv_heads": 4, "max_seq_len": 1024},
}
ARCHS = ("llama", "gpt2")


def swiglu_width(dim: int) -> int:
    return 32 * math.ceil(8 * dim / 3 / 32)


def model_config(size: str, arch: str, vocab_size: int, **overrides: Any) -> ModelConfig:
    """The ModelConfig of preset `size` in `arch` shape, with `overrides` (None values ignored)."""
    if size not in PRESETS:
        raise LlmosError(f"unknown size {size!r}: choose one of {', '.join(PRESETS)}")
    if arch not in ARCHS:
        raise LlmosError(f"unknown architecture {arch!r}: choose llama or gpt2")
    shape: dict[str, Any] = dict(PRESETS[size])
    shape.update({k: v for k, v in overrides.items() if v is not None})
    dim = int(shape["dim"])
    if arch == "gpt2":
        shape["n_kv_heads"] = shape["n_heads"]
        shape.setdefault("ffn_dim", 4 * dim)
        return ModelConfig(arch="gpt2", vocab_size=vocab_size, act="gelu_new", tie_embeddings=True,
                           name=f"llmos-{size}-gpt2", **shape)
    if overrides.get("n_heads") and not overrides.get("n_kv_heads"):
        shape["n_kv_heads"] = max(1, int(shape["n_heads"]) // 2)
    shape.setdefault("ffn_dim", swiglu_width(dim))
    return ModelConfig(arch="llama", vocab_size=vocab_size, tie_embeddings=True, norm_eps=1e-5,
                       name=f"llmos-{size}-llama", **shape)


# Output projections of each residual branch: their init is scaled down by depth (GPT-2 paper).
_RESIDUAL_OUT = ("attn.wo.weight", "mlp.w2.weight", "mlp.proj.weight")


def init_weights(model: nn.Module, n_layers: int, std: float = 0.02) -> None:
    """GPT-2 style init: N(0, 0.02) for matrices and embeddings, 0.02/sqrt(2 * layers) for the
    residual output projections, zero biases, unit norms. Draws from torch's global RNG (seed first)."""
    for name, p in model.named_parameters():
        if name.endswith(_RESIDUAL_OUT):
            nn.init.normal_(p, 0.0, std / math.sqrt(2 * n_layers))
        elif p.dim() >= 2:
            nn.init.normal_(p, 0.0, std)
        elif name.endswith("bias"):
            nn.init.zeros_(p)
        else:  # RMSNorm / LayerNorm gains
            nn.init.ones_(p)
