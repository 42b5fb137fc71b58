"""The GPT-2 family: learned positions, LayerNorm, GELU (tanh) MLP, multi-head attention, tied head.

Contract: `forward(tokens (B, T), positions (T,) or (B, T), cache=None) -> logits (B, T, V)`, as llama.py.
The loader transposes Hugging Face's Conv1D weights (in, out) into nn.Linear's (out, in).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmos.config import ModelConfig
from llmos.models import attention
from llmos.models.kernels import PYTORCH, Kernels
from llmos.models.kv_cache import KVCache


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.hd = config.n_heads, config.head_size
        self.wqkv = nn.Linear(config.dim, 3 * config.dim)
        self.wo = nn.Linear(config.dim, config.dim)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache | None, layer: int,
                how: attention.Plan) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.wqkv(x).split(C, dim=-1)
        q = q.view(B, T, self.n_heads, self.hd).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_heads, self.hd).transpose(1, 2)  # (B, H, T, D)
        v = v.view(B, T, self.n_heads, self.hd).transpose(1, 2)  # (B, H, T, D)
        if cache is not None:
            k, v = cache.update(layer, positions, k, v)  # (B, H, S, D)
        y = attention.attend(q, k, v, how).transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.wo(y)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.dim, config.ffn_dim)
        self.proj = nn.Linear(config.ffn_dim, config.dim)
        self.approximate = "tanh" if config.act == "gelu_new" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate=self.approximate))


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.attn = Attention(config)
        self.ln_2 = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache | None, layer: int,
                how: attention.Plan) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), positions, cache, layer, how)
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
    kernels: Kernels = PYTORCH  # the loader installs faster ones (models/kernels.py)

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.pos_embed = nn.Embedding(config.max_seq_len, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.output.weight = self.embed.weight

    def hidden(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Final normed hidden states (B, T, C); the engine applies `logits` to the rows it needs."""
        if int(positions.max()) >= self.config.max_seq_len:
            raise ValueError(f"position {int(positions.max())} is beyond GPT-2's {self.config.max_seq_len} learned positions")
        x = self.embed(tokens) + self.pos_embed(positions)  # (B, T, C)
        how = attention.plan(positions, positions.shape[-1] if cache is None else cache.begin(positions),
                             kernels=self.kernels)
        for i, block in enumerate(self.layers):
            x = block(x, positions, cache, i, how)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of hidden states (..., C) -> (..., V): what the engine calls on the rows it needs."""
        return self.output(hidden)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        return self.logits(self.hidden(tokens, positions, cache))  # (B, T, V)
