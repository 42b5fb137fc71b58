"""The Gemma 3 family (text): Gemma 3 270M, 1B, 4B, 12B, 27B as causal language models.

What sets it apart from Llama (models/llama.py), following transformers' Gemma3ForCausalLM:
- embeddings multiplied by sqrt(dim), the factor rounded to the weights' dtype first;
- RMSNorm scaling by (1 + w): the parameter here holds the multiplier (1 + w) itself, so a norm is one
  `F.rms_norm` call; the loader adds the 1 to Hugging Face weights (GGUF files store it added);
- four norms a block (before and after attention, before and after the MLP) and RMSNorm on each
  head's queries and keys;
- GeGLU with the tanh GELU; head size independent of dim; scores scaled by query_pre_attn_scalar ** -0.5;
- sliding-window attention on the layers `config.layer_types` names "sliding_attention" (five of six),
  full attention on the others, each kind with its RoPE base (local 10,000, global from the file,
  with the file's scaling);
- tied input and output embeddings.

Contract: `forward(tokens (B, T), positions (T,) or (B, T), cache=None) -> logits (B, T, V)`, and
`hidden` + `output` as in llama.py, which the engine uses. The cache holds every position for every
layer; a sliding layer masks the keys that left its window, in prefill and in decode alike.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llmos.config import ModelConfig
from llmos.models import attention
from llmos.models.kernels import PYTORCH, Kernels
from llmos.models.kv_cache import KVCache
from llmos.models.llama import apply_rope, rope_inv_freq


class RMSNorm(nn.Module):
    """x / rms(x) * weight, where `weight` is Gemma's (1 + w): ones for a fresh model."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def rope_tables(inv_freq: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin (S, D) for positions 0..length-1 (see llama.rope_tables)."""
    freqs = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)  # (S, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (S, D)
    half = freqs.shape[-1]
    return emb.cos(), emb.sin() * torch.cat((-torch.ones(half), torch.ones(half)))


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.hd = config.n_heads, config.n_kv_heads, config.head_size
        self.wqkv = nn.Linear(config.dim, (self.n_heads + 2 * self.n_kv) * self.hd, bias=config.qkv_bias)
        self.wo = nn.Linear(self.n_heads * self.hd, config.dim, bias=False)
        self.q_norm = RMSNorm(self.hd, config.norm_eps)
        self.k_norm = RMSNorm(self.hd, config.norm_eps)
        # attention.attend scales by head_size ** -0.5; queries carry the rest of Gemma's scale
        self.q_scale = math.sqrt(self.hd) / math.sqrt(config.query_pre_attn_scalar or self.hd)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                cache: KVCache | None, layer: int, how: attention.Plan) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.wqkv.forward(x).view(B, T, self.n_heads + 2 * self.n_kv, self.hd)  # (B, T, H + 2 Hkv, D)
        q = apply_rope(self.q_norm.forward(qkv[:, :, : self.n_heads]), cos, sin)  # (B, T, H, D)
        k = apply_rope(self.k_norm.forward(qkv[:, :, self.n_heads : self.n_heads + self.n_kv]), cos, sin)
        if self.q_scale != 1.0:
            q = q * self.q_scale
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, D), (B, Hkv, T, D)
        v = qkv[:, :, self.n_heads + self.n_kv :].transpose(1, 2)  # (B, Hkv, T, D)
        if cache is not None:
            k, v = cache.update(layer, positions, k, v)  # (B, Hkv, S, D)
        y = attention.attend(q, k, v, how)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd)  # (B, T, H*D)
        return self.wo.forward(y)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.w13 = nn.Linear(config.dim, 2 * config.ffn_dim, bias=False)  # gate and up, fused
        self.w2 = nn.Linear(config.ffn_dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13.forward(x).chunk(2, dim=-1)
        return self.w2.forward(F.gelu(gate, approximate="tanh") * up)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, sliding: bool) -> None:
        super().__init__()
        self.sliding = sliding
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attn = Attention(config)
        self.post_attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.mlp_norm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config)
        self.post_mlp_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x, cos, sin, positions, cache, layer, how) -> torch.Tensor:
        h = self.attn.forward(self.attn_norm.forward(x), cos, sin, positions, cache, layer, how)
        x = x + self.post_attn_norm.forward(h)
        return x + self.post_mlp_norm.forward(self.mlp.forward(self.mlp_norm.forward(x)))


class Gemma3(nn.Module):
    kernels: Kernels = PYTORCH  # installed by the loader (models/kernels.py): prompt attention, the int8 head

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        kinds = config.layer_types or ("full_attention",) * config.n_layers
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, kind == "sliding_attention") for kind in kinds)
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self._rope: dict[bool, tuple[torch.Tensor, torch.Tensor]] = {}

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.output.weight = self.embed.weight

    def embed_from_head(self, head: nn.Module) -> None:
        """Called by the loader when a tied head is converted to a form that also serves embeddings
        (quant.Int8Head): the 262k-row table is most of the model, so it is kept once."""
        self.embed = head.embedding()

    def _inv_freq(self, sliding: bool) -> torch.Tensor:
        c = self.config
        if sliding:  # the local base, unscaled
            return 1.0 / (c.rope_local_theta ** (torch.arange(0, c.head_size, 2, dtype=torch.float64) / c.head_size)).float()
        return rope_inv_freq(c)

    def rope(self, positions: torch.Tensor, sliding: bool) -> tuple[torch.Tensor, torch.Tensor]:
        # Lazy and grown by doubling, as in llama.py; one table pair per layer kind.
        need = int(positions.max()) + 1
        have = self._rope.get(sliding)
        if have is None or have[0].shape[0] < need:
            size = min(max(need, 2 * (0 if have is None else have[0].shape[0]), 256), self.config.max_seq_len)
            have = self._rope[sliding] = rope_tables(self._inv_freq(sliding), max(size, need))
        cos, sin = have
        return cos[positions].unsqueeze(-2), sin[positions].unsqueeze(-2)  # (T, 1, D) or (B, T, 1, D)

    def hidden(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Final normed hidden states (B, T, C); the engine applies `logits` to the rows it needs."""
        x = self.embed(tokens)  # (B, T, C)
        x = x * torch.tensor(math.sqrt(self.config.dim), dtype=x.dtype)  # rounded to the dtype first, as HF does
        n_keys = positions.shape[-1] if cache is None else cache.begin(positions)
        kinds = {block.sliding for block in self.layers}
        ropes = {s: tuple(t.to(x.dtype) for t in self.rope(positions, s)) for s in kinds}
        plans = {s: attention.plan(positions, n_keys, self.config.sliding_window if s else None, self.kernels)
                 for s in kinds}
        for i, block in enumerate(self.layers):
            cos, sin = ropes[block.sliding]
            x = block.forward(x, cos, sin, positions, cache, i, plans[block.sliding])
        return self.norm.forward(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of hidden states (..., C) -> (..., V): what the engine calls on the rows it needs."""
        return self.output(hidden)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        return self.logits(self.hidden(tokens, positions, cache))  # (B, T, V)
