"""The Llama family: Llama 2/3, Mistral, SmolLM2, Qwen2 (q/k/v biases), Qwen3 (q/k RMSNorm), Phi-3.

RMSNorm, rotary position embeddings (Hugging Face "rotate half" layout, with the file's theta and
linear, llama3 or LongRoPE scaling, over all of each head or its first `rope_dim` dims), grouped-query
attention, SwiGLU MLP. Projections are fused, q/k/v into `wqkv` and gate/up into `w13`, so a decode
step runs two matmuls fewer per layer; the loader fuses them (weights/load.py), or takes them fused
from Phi-3's checkpoints.

LongRoPE (Phi-3) has two sets of frequencies: a forward whose furthest position is past the
pretraining context (`original_max_position_embeddings`) uses the long factors for all its positions,
otherwise the short ones, as transformers does; a prompt prefilled in chunks counts as one forward
(the cache's `extent` says where it ends). Keys cached while the sequence was shorter keep the rotation
they got: the engine runs the whole sequence again when it first passes that point, as transformers
does (engine/generate.py `restarts`). Per-row positions choose per row, so a batch row gets what it
gets alone.

Contract: `forward(tokens (B, T), positions (T,) or (B, T), cache=None) -> logits (B, T, V)` in the
weights' dtype. `positions` are absolute; with a cache the model attends to every cached position up
to the query's own. Per-row positions (B, T) let a batch hold sequences of different lengths (the
batched engine); each row then sees only its own cached keys up to its position.

Submodules are called through `.forward` directly: `nn.Module.__call__` costs a few microseconds a
call, ~10% of a batch-1 decode step over 30 layers of 9 calls each (measured 7.56 -> 6.84 ms/token).
Hooks registered on a block's submodules therefore do not fire; hooks on the model itself do.
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


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_inv_freq(config: ModelConfig, long: bool = False) -> torch.Tensor:
    """Inverse frequencies (D/2,) with the config's scaling applied (LongRoPE: the long factors if `long`)."""
    d = config.rotary_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq.float()
    if scaling["rope_type"] == "longrope":  # each frequency divided by its own factor
        factors = torch.tensor(scaling["long_factor" if long else "short_factor"], dtype=torch.float64)
        return (inv_freq / factors).float()
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return (inv_freq / factor).float()
    # llama3: keep high frequencies, divide low ones by `factor`, blend in between.
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_ctx = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > old_ctx / low, inv_freq / factor, blended)
    out = torch.where(wavelen < old_ctx / high, inv_freq, out)
    return out.float()


def rope_tables(config: ModelConfig, length: int, long: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin tables (S, D) for positions 0..length-1.

    The sin table carries the sign of the "rotate half" layout, (-sin, +sin) over the two halves,
    so a rotation is `x * cos + roll(x, D/2) * sin`: the same products as rotate_half, fewer ops.
    LongRoPE scales both by its attention factor."""
    t = torch.arange(length, dtype=torch.float32)
    freqs = torch.outer(t, rope_inv_freq(config, long))  # (S, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (S, D)
    half = freqs.shape[-1]
    sign = torch.cat((-torch.ones(half), torch.ones(half)))
    scale = (config.rope_scaling or {}).get("attention_factor", 1.0)
    if scale != 1.0:
        return emb.cos() * scale, emb.sin() * scale * sign
    return emb.cos(), emb.sin() * sign


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., D) rotated by cos and signed sin (broadcastable to x), "rotate half" layout."""
    return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * sin


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.hd = config.n_heads, config.n_kv_heads, config.head_size
        self.wqkv = nn.Linear(config.dim, (self.n_heads + 2 * self.n_kv) * self.hd, bias=config.qkv_bias)
        self.wo = nn.Linear(self.n_heads * self.hd, config.dim, bias=False)
        self.rope_dim = config.rotary_dim
        # Qwen3: each head's q and k RMS-normalised (weights shared by the heads) before the rotation
        self.q_norm = RMSNorm(self.hd, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.hd, config.norm_eps) if config.qk_norm else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                cache: KVCache | None, layer: int, how: attention.Plan) -> torch.Tensor:
        B, T, _ = x.shape
        H = self.n_heads
        qkv = self.wqkv.forward(x).view(B, T, H + 2 * self.n_kv, self.hd)  # (B, T, H + 2 Hkv, D)
        qk = qkv[:, :, : H + self.n_kv]
        if self.q_norm is not None:
            qk = torch.cat((self.q_norm.forward(qk[:, :, :H]), self.k_norm.forward(qk[:, :, H:])), dim=2)
        if self.rope_dim == self.hd:
            qk = apply_rope(qk, cos, sin)  # q and k rotated in one go
        else:  # partial rotary: the last D - rope_dim dims pass through unturned
            qk = torch.cat((apply_rope(qk[..., : self.rope_dim], cos, sin), qk[..., self.rope_dim :]), dim=-1)
        q = qk[:, :, : self.n_heads].transpose(1, 2)  # (B, H, T, D)
        k = qk[:, :, self.n_heads :].transpose(1, 2)  # (B, Hkv, T, D)
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
        if torch.is_grad_enabled():
            return self.w2.forward(F.silu(gate) * up)
        return self.w2.forward(F.silu(gate, inplace=True).mul_(up))  # same values, no new buffers


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, positions, cache, layer, how) -> torch.Tensor:
        x = x + self.attn.forward(self.attn_norm.forward(x), cos, sin, positions, cache, layer, how)
        return x + self.mlp.forward(self.mlp_norm.forward(x))


class Llama(nn.Module):
    kernels: Kernels = PYTORCH  # the loader installs faster ones (models/kernels.py)

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None
        self._rope_long: tuple[torch.Tensor, torch.Tensor] | None = None  # LongRoPE's second set

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.output.weight = self.embed.weight

    def rope(self, positions: torch.Tensor, extent: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin rows for `positions`; `extent`: where the sequence being prefilled ends (LongRoPE)."""
        # Built lazily (not a buffer) so meta-device init and state dicts stay free of derived tables,
        # and grown by doubling so a 128k-context model does not pay for positions it never sees.
        need = max(int(positions.max()) + 1, extent)
        switch = self.config.rope_switch
        longrope = switch is not None
        if self._rope is None or self._rope[0].shape[0] < need:
            size = min(max(need, 2 * (0 if self._rope is None else self._rope[0].shape[0]), 256), self.config.max_seq_len)
            self._rope = rope_tables(self.config, max(size, need))
            self._rope_long = rope_tables(self.config, max(size, need), long=True) if longrope else None
        cos, sin = self._rope
        if longrope and need > switch:
            long_cos, long_sin = self._rope_long
            if positions.dim() == 1:
                cos, sin = long_cos, long_sin
            else:  # per row: the long set for rows whose furthest position is past the original context
                long = (positions.amax(dim=1) >= switch)[:, None, None]  # (B, 1, 1)
                return (torch.where(long, long_cos[positions], cos[positions]).unsqueeze(-2),
                        torch.where(long, long_sin[positions], sin[positions]).unsqueeze(-2))
        # (T, 1, D) or per row (B, T, 1, D): broadcast over the heads of a (B, T, heads, D) tensor.
        return cos[positions].unsqueeze(-2), sin[positions].unsqueeze(-2)

    def hidden(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Final normed hidden states (B, T, C); the engine applies `logits` to the rows it needs."""
        x = self.embed(tokens)  # (B, T, C)
        cos, sin = self.rope(positions, 0 if cache is None else cache.extent)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        n_keys = positions.shape[-1] if cache is None else cache.begin(positions)
        how = attention.plan(positions, n_keys, self.config.sliding_window, self.kernels)
        for i, block in enumerate(self.layers):
            x = block.forward(x, cos, sin, positions, cache, i, how)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of hidden states (..., C) -> (..., V): what the engine calls on the rows it needs."""
        return self.output(hidden)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        return self.logits(self.hidden(tokens, positions, cache))  # (B, T, V)
