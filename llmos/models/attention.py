"""Causal attention for the decoder-only model files, planned once per forward.

`plan(positions, n_keys, window)` works out, once for all layers, which attention a forward needs:
- plain causal: a prompt from position 0 with no cached prefix;
- unmasked: one new token per sequence, all at the same position, attending to every cached key;
- per row: a batched decode step whose rows sit at different positions. Each row attends over
  exactly its own keys, the same computation as decoding it alone, so batching never changes a token
  (attention over masked padding differs in the last bits);
- a boolean mask otherwise: a chunk after cached positions, or a sliding window.
The layers then only call `attend`, with no per-layer branching, host syncs or mask building.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def attention_mask(q_pos: torch.Tensor, n_keys: int, window: int | None) -> torch.Tensor:
    """Boolean mask (T, S), or (B, 1, T, S) for per-row positions (B, T): a query at q_pos may see
    key k when k <= q_pos (and within the sliding window)."""
    k_pos = torch.arange(n_keys, device=q_pos.device)
    q = q_pos[..., None]  # (..., T, 1)
    mask = k_pos <= q
    if window is not None:
        mask &= k_pos > q - window
    return mask if q_pos.dim() == 1 else mask[:, None]


@dataclass(frozen=True)
class Plan:
    causal: bool = False
    mask: torch.Tensor | None = None
    rows: tuple[tuple[int, torch.Tensor | None], ...] | None = None  # per row: (keys, mask)


def plan(positions: torch.Tensor, n_keys: int, window: int | None = None) -> Plan:
    """The attention for queries at `positions` (T,) or per row (B, T) over `n_keys` keys."""
    T = positions.shape[-1]
    if positions.dim() == 2 and T == 1:
        ends = (positions[:, 0] + 1).tolist()
        return Plan(rows=tuple(
            (e, None if window is None else attention_mask(torch.tensor([e - 1]), e, window)) for e in ends))
    if positions.dim() == 1 and window is None:
        if T == n_keys and int(positions[0]) == 0:
            return Plan(causal=True)
        if T == 1:
            return Plan()
    return Plan(mask=attention_mask(positions, n_keys, window))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Plan) -> torch.Tensor:
    """Scaled dot-product attention of q (B, H, T, D) over k, v (B, Hkv, S, D), Hkv dividing H."""
    gqa = k.shape[1] != q.shape[1]
    if plan.rows is not None:
        return torch.cat([
            F.scaled_dot_product_attention(q[b:b + 1], k[b:b + 1, :, :e], v[b:b + 1, :, :e], attn_mask=m, enable_gqa=gqa)
            for b, (e, m) in enumerate(plan.rows)])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=plan.mask, is_causal=plan.causal, enable_gqa=gqa)
