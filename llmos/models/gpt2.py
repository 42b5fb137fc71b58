"""The GPT-2 family: learned positions, LayerNorm, GELU (tanh) MLP, multi-head attention, tied head.

Contract: `forward(tokens (B, T), positions (T,) or (B, T), cache=None) -> logits (B, T, V)`, as llama.py.
The loader transposes Hugging Face's Conv1D weights (in, out) into nn.Linear's (out, in).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmos.config import ModelConfig
from llmos.models.kv_cache import KVCache


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.hd = config.n_heads, config.head_size
        self.wqkv = nn.Linear(config.dim, 3 * config.dim)
        self.wo = nn.Linear(config.dim, config.dim)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache | None, layer: int) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.wqkv(x).split(C, dim=-1)
        q = q.view(B, T, self.n_heads, self.hd).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_heads, self.hd).transpose(1, 2)  # (B, H, T, D)
        v = v.view(B, T, self.n_heads, self.hd).transpose(1, 2)  # (B, H, T, D)
        if cache is not None:
            k, v = cache.update(layer, positions, k, v)  # (B, H, S, D)
        if positions.dim() == 2 and T == 1:
            # Batched decode: each row attends over exactly its own keys, as it would alone.
            ends = (positions[:, 0] + 1).tolist()
            y = torch.cat([attend(q[b:b + 1], k[b:b + 1, :, :e], v[b:b + 1, :, :e], positions[b])
                           for b, e in enumerate(ends)])
        else:
            y = attend(q, k, v, positions)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.wo(y)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Causal scaled dot-product attention of q (B, H, T, D) over k, v (B, H, S, D)."""
    T, S = q.shape[2], k.shape[2]
    if positions.dim() == 1 and T == S and int(positions[0]) == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if positions.dim() == 1 and T == 1:
        return F.scaled_dot_product_attention(q, k, v)
    mask = torch.arange(S, device=q.device) <= positions[..., None]  # (T, S) or (B, T, S)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask if positions.dim() == 1 else mask[:, None])


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

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache | None, layer: int) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), positions, cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
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
        """Final normed hidden states (B, T, C); the engine applies `output` to the rows it needs."""
        if int(positions.max()) >= self.config.max_seq_len:
            raise ValueError(f"position {int(positions.max())} is beyond GPT-2's {self.config.max_seq_len} learned positions")
        x = self.embed(tokens) + self.pos_embed(positions)  # (B, T, C)
        for i, block in enumerate(self.layers):
            x = block(x, positions, cache, i)
        return self.norm(x)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        return self.output(self.hidden(tokens, positions, cache))  # (B, T, V)
