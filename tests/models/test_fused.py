"""Fused projections equal the unfused computation they replace: q/k/v in one `wqkv` matmul and
gate/up in one `w13` matmul give what separate q, k, v, gate and up layers give (fp32, atol 1e-5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmos.config import ModelConfig
from llmos.models import attention
from llmos.models.llama import Llama, apply_rope


def _tiny(**overrides) -> Llama:
    torch.manual_seed(0)
    config = ModelConfig(arch="llama", vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                         ffn_dim=96, max_seq_len=64, norm_eps=1e-5, rope_theta=10000.0, **overrides)
    model = Llama(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def _unfused_block(block, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """One block with separate q, k, v, gate and up projections, sliced out of the fused weights."""
    a = block.attn
    H, Hkv, D = a.n_heads, a.n_kv, a.hd
    B, T, _ = x.shape
    wq, wk, wv = a.wqkv.weight.split([H * D, Hkv * D, Hkv * D])
    bq, bk, bv = a.wqkv.bias.split([H * D, Hkv * D, Hkv * D]) if a.wqkv.bias is not None else (None,) * 3
    h = F.rms_norm(x, (x.shape[-1],), block.attn_norm.weight, block.attn_norm.eps)
    q = apply_rope(F.linear(h, wq, bq).view(B, T, H, D), cos, sin).transpose(1, 2)
    k = apply_rope(F.linear(h, wk, bk).view(B, T, Hkv, D), cos, sin).transpose(1, 2)
    v = F.linear(h, wv, bv).view(B, T, Hkv, D).transpose(1, 2)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    x = x + F.linear(y.transpose(1, 2).reshape(B, T, H * D), a.wo.weight)
    gate_w, up_w = block.mlp.w13.weight.chunk(2)
    h = F.rms_norm(x, (x.shape[-1],), block.mlp_norm.weight, block.mlp_norm.eps)
    return x + F.linear(F.silu(F.linear(h, gate_w)) * F.linear(h, up_w), block.mlp.w2.weight)


def _check(model: Llama) -> None:
    tokens = torch.randint(0, 128, (2, 12))
    positions = torch.arange(12)
    with torch.no_grad():
        cos, sin = model.rope(positions)
        fused = unfused = model.embed(tokens)
        how = attention.plan(positions, 12)
        for i, block in enumerate(model.layers):
            fused = block(fused, cos, sin, positions, None, i, how)
            unfused = _unfused_block(block, unfused, cos, sin)
    assert (fused - unfused).abs().max().item() < 1e-5


def test_fused_projections_equal_unfused():
    _check(_tiny())


def test_fused_projections_with_qkv_biases_equal_unfused():
    _check(_tiny(qkv_bias=True))
