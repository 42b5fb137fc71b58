"""Gemma 2: Llama's skeleton with Google's choices at every step.

- embeddings multiplied by sqrt(dim) (rounded to the weights' dtype, as transformers does);
- RMSNorm scaling by (1 + weight), the weight stored zero-centred (Hugging Face's layout; llama.cpp
  stores 1 + weight and the loader subtracts 1), computed in fp32;
- four norms a block: before and after attention, before and after the MLP (each "after" norm is
  applied to the branch's output before it joins the residual stream);
- attention scores scaled by query_pre_attn_scalar ** -0.5 (not head_size ** -0.5) and soft-capped,
  s -> c * tanh(s / c), before the mask and softmax; so attention is computed here, not by SDPA;
- layers alternate between a sliding window (even layers) and the whole context (odd ones);
- GeGLU MLP (tanh GELU), tied embeddings, final logits soft-capped too.

Projections are fused as in llama.py (`wqkv`, `w13`, same names), so the loader, LoRA, the quantized
forms and export treat the two files alike. Rotary positions use the rotate-half layout, unscaled.

Contract: `forward(tokens (B, T), positions (T,) or (B, T), cache=None) -> logits (B, T, V)`; the
engine calls `hidden` then `logits` on the rows it needs. The native C++ decode step does not cover
this file (engine/native.py declines it): decoding runs the Python path.
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

CHUNK = 256  # queries per attention chunk: bounds the (B, H, T, S) score tensor of a long prompt


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))  # zero-centred: the scale is 1 + weight
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 throughout, and the (1 + w) product before rounding back: Gemma's order, not Llama's
        y = F.rms_norm(x.float(), (x.shape[-1],), None, self.eps) * (1.0 + self.weight.float())
        return y.to(x.dtype)


def rope_tables(config: ModelConfig, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin tables (S, D) for positions 0..length-1: the sin table carries the rotate-half
    sign, (-sin, +sin) over the two halves, so a rotation is `x * cos + roll(x, D/2) * sin`."""
    d = config.head_size
    inv_freq = (1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))).float()
    freqs = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)  # (S, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (S, D)
    sign = torch.cat((-torch.ones(d // 2), torch.ones(d // 2)))
    return emb.cos(), emb.sin() * sign


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., D) rotated by cos and signed sin (broadcastable to x)."""
    return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * sin


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """c * tanh(x / c): x kept within (-c, c), nearly unchanged where |x| << c."""
    return x if cap is None else torch.tanh(x / cap) * cap


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
           cap: float | None) -> torch.Tensor:
    """Soft-capped attention of q (B, H, T, D) over k, v (B, Hkv, S, D) under a boolean mask (T, S) or
    (B, 1, T, S): scores scaled, capped, masked, softmax in fp32."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    k, v = k.to(q.dtype), v.to(q.dtype)  # an fp16 cache is read back in the queries' dtype
    qg = q.view(B, Hkv, H // Hkv, T, D)  # (B, Hkv, G, T, D): the query heads that share a kv head
    out = []
    for start in range(0, T, CHUNK):
        stop = min(start + CHUNK, T)
        scores = qg[:, :, :, start:stop] @ k.transpose(-1, -2)[:, :, None] * scale  # (B, Hkv, G, t, S)
        scores = softcap(scores, cap)
        m = mask[..., start:stop, :]
        m = m[:, :, None] if m.dim() == 4 else m  # (B, 1, 1, t, S) or (t, S)
        scores = scores.masked_fill(~m, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        out.append(probs @ v[:, :, None])  # (B, Hkv, G, t, D)
    return torch.cat(out, dim=3).view(B, H, T, D)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.hd = config.n_heads, config.n_kv_heads, config.head_size
        self.wqkv = nn.Linear(config.dim, (self.n_heads + 2 * self.n_kv) * self.hd, bias=False)
        self.wo = nn.Linear(self.n_heads * self.hd, config.dim, bias=False)
        self.scale = (config.query_pre_attn_scalar or self.hd) ** -0.5
        self.cap = config.attn_softcap

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                cache: KVCache | None, layer: int, mask: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.wqkv.forward(x).view(B, T, self.n_heads + 2 * self.n_kv, self.hd)  # (B, T, H + 2 Hkv, D)
        qk = apply_rope(qkv[:, :, : self.n_heads + self.n_kv], cos, sin)
        q = qk[:, :, : self.n_heads].transpose(1, 2)  # (B, H, T, D)
        k = qk[:, :, self.n_heads :].transpose(1, 2)  # (B, Hkv, T, D)
        v = qkv[:, :, self.n_heads + self.n_kv :].transpose(1, 2)  # (B, Hkv, T, D)
        if cache is not None:
            k, v = cache.update(layer, positions, k, v)  # (B, Hkv, S, D)
        y = attend(q, k, v, mask, self.scale, self.cap)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd)  # (B, T, H*D)
        return self.wo.forward(y)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.w13 = nn.Linear(config.dim, 2 * config.ffn_dim, bias=False)  # gate and up, fused
        self.w2 = nn.Linear(config.ffn_dim, config.dim, bias=False)
        self.approximate = "tanh" if config.act == "gelu_new" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13.forward(x).chunk(2, dim=-1)
        return self.w2.forward(F.gelu(gate, approximate=self.approximate) * up)


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

    def forward(self, x, cos, sin, positions, cache, layer, mask) -> torch.Tensor:
        h = self.attn.forward(self.attn_norm.forward(x), cos, sin, positions, cache, layer, mask)
        x = x + self.post_attn_norm.forward(h)
        return x + self.post_mlp_norm.forward(self.mlp.forward(self.mlp_norm.forward(x)))


class Gemma2(nn.Module):
    kernels: Kernels = PYTORCH  # installed by the loader (models/kernels.py); its int4 layers use them

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        types = config.layer_types or ("full_attention",) * config.n_layers
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, t == "sliding_attention") for t in types)
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.output.weight = self.embed.weight

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        need = int(positions.max()) + 1  # tables built lazily and grown by doubling, as in llama.py
        if self._rope is None or self._rope[0].shape[0] < need:
            size = min(max(need, 2 * (0 if self._rope is None else self._rope[0].shape[0]), 256), self.config.max_seq_len)
            self._rope = rope_tables(self.config, max(size, need))
        cos, sin = self._rope
        return cos[positions].unsqueeze(-2), sin[positions].unsqueeze(-2)  # (T, 1, D) or (B, T, 1, D)

    def hidden(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Final normed hidden states (B, T, C); the engine applies `logits` to the rows it needs."""
        x = self.embed(tokens)  # (B, T, C)
        x = x * torch.tensor(math.sqrt(self.config.dim), dtype=x.dtype)
        cos, sin = self.rope(positions)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        n_keys = positions.shape[-1] if cache is None else cache.begin(positions)
        # One mask per layer kind, built once per forward: (T, S), or (B, 1, T, S) for per-row positions
        full = attention.attention_mask(positions, n_keys, None)
        window = attention.attention_mask(positions, n_keys, self.config.sliding_window)
        for i, block in enumerate(self.layers):
            x = block.forward(x, cos, sin, positions, cache, i, window if block.sliding else full)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Soft-capped logits of hidden states (..., C) -> (..., V)."""
        return softcap(self.output(hidden), self.config.final_softcap)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        return self.logits(self.hidden(tokens, positions, cache))  # (B, T, V)
