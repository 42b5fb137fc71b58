"""Causal attention for the decoder-only model files, planned once per forward.

`plan(positions, n_keys, window)` works out, once for all layers, which attention a forward needs:
- plain causal: a prompt from position 0 with no cached prefix;
- unmasked: one new token per sequence, all at the same position, attending to every cached key;
- per row: a batched decode step whose rows sit at different positions. Each row attends over
  exactly its own keys, the same computation as decoding it alone, so batching never changes a token
  (attention over masked padding differs in the last bits);
- a boolean mask otherwise: a chunk after cached positions, or a sliding window;
- in query chunks: a long run of new positions (a prompt) at inference. Each chunk of CHUNK queries
  attends only to the keys up to its last query, so the masked upper triangle is mostly skipped
  (PyTorch's CPU flash attention computes all of it when the keys fit one block): at 512 tokens,
  2.4 ms instead of 3.3 ms per layer.
- by the model's kernels: consecutive new positions (a prompt, or a chunk of one after cached
  positions) at inference, in fp32, go to `kernels.causal_attention` (models/kernels.py; the native
  extension's causal kernel: 1.0 ms per layer at 512 tokens, ~3e-7 from SDPA, and a query's result
  does not depend on how the prompt was split into chunks). The plan keeps the SDPA route for
  kernels that have none.
The layers then only call `attend`, with no per-layer branching, host syncs or mask building.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmos.models.kernels import PYTORCH, Kernels


def attention_mask(q_pos: torch.Tensor, n_keys: int, window: int | None) -> torch.Tensor:
    """Boolean mask (T, S), or (B, 1, T, S) for per-row positions (B, T): a query at q_pos may see
    key k when k <= q_pos (and within the sliding window)."""
    k_pos = torch.arange(n_keys, device=q_pos.device)
    q = q_pos[..., None]  # (..., T, 1)
    mask = k_pos <= q
    if window is not None:
        mask &= k_pos > q - window
    return mask if q_pos.dim() == 1 else mask[:, None]


CHUNK = 64


@dataclass(frozen=True)
class Plan:
    causal: bool = False
    mask: torch.Tensor | None = None
    rows: tuple[tuple[int, torch.Tensor | None], ...] | None = None  # per row: (keys, mask)
    chunks: tuple[tuple[int, int, int, torch.Tensor | None], ...] | None = None  # (start, stop, keys, mask)
    start: int | None = None  # consecutive positions from here: the kernels' causal attention may take them
    kernels: Kernels = PYTORCH


def additive(mask: torch.Tensor) -> torch.Tensor:
    """A boolean mask as the 0 / -inf float mask attention adds to its scores, built once per forward
    instead of by every layer's attention call (the same values it would build)."""
    return torch.zeros(mask.shape).masked_fill_(~mask, float("-inf"))


def plan(positions: torch.Tensor, n_keys: int, window: int | None = None, kernels: Kernels = PYTORCH) -> Plan:
    """The attention for queries at `positions` (T,) or per row (B, T) over `n_keys` keys."""
    if window is not None and int(positions.max()) < window:
        # No query is far enough along for a key to leave its window: plain causal attention, so a
        # sliding layer's prompt (Gemma's up to 512 tokens) gets the causal kernel, not a mask.
        window = None
    T = positions.shape[-1]
    if positions.dim() == 2 and T == 1:
        ends = (positions[:, 0] + 1).tolist()
        return Plan(rows=tuple(
            (e, None if window is None else attention_mask(torch.tensor([e - 1]), e, window)) for e in ends))
    if positions.dim() == 1 and window is None:
        start = int(positions[0])
        native = start if T > 1 and kernels is not PYTORCH and not torch.is_grad_enabled() \
            and n_keys == start + T and torch.equal(positions, torch.arange(start, start + T)) else None
        if T >= 2 * CHUNK and not torch.is_grad_enabled():
            return Plan(chunks=_chunks(positions), start=native, kernels=kernels)
        if T == n_keys and start == 0:
            return Plan(causal=True, start=native, kernels=kernels)
        if T == 1:
            return Plan()
        return Plan(mask=additive(attention_mask(positions, n_keys, window)), start=native, kernels=kernels)
    return Plan(mask=additive(attention_mask(positions, n_keys, window)))


def _chunks(positions: torch.Tensor) -> tuple[tuple[int, int, int, torch.Tensor | None], ...]:
    """Query chunks of a run of positions (T,): each reads keys 0..its last position. A first chunk
    starting at position 0 with consecutive positions is plain causal; the others carry a mask."""
    T, out = positions.shape[0], []
    plain = int(positions[0]) == 0 and int(positions[-1]) == T - 1
    for start in range(0, T, CHUNK):
        stop = min(start + CHUNK, T)
        keys = int(positions[stop - 1]) + 1
        causal = plain and start == 0
        out.append((start, stop, keys, None if causal else additive(attention_mask(positions[start:stop], keys, None))))
    return tuple(out)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Plan) -> torch.Tensor:
    """Scaled dot-product attention of q (B, H, T, D) over k, v (B, Hkv, S, D), Hkv dividing H."""
    if plan.start is not None and q.dtype == torch.float32 and q.shape[-1] % 16 == 0:
        y = plan.kernels.causal_attention(q, k, v, plan.start)
        if y is not None:
            return y
    if k.dtype != q.dtype:  # an fp16 cache (kv_cache.cache_dtype): attend in the queries' dtype
        k, v = k.to(q.dtype), v.to(q.dtype)
    gqa = k.shape[1] != q.shape[1]

    def cast(m: torch.Tensor | None) -> torch.Tensor | None:  # float masks are built in fp32
        return m if m is None or m.dtype == torch.bool or m.dtype == q.dtype else m.to(q.dtype)

    if plan.chunks is not None:
        return torch.cat([
            F.scaled_dot_product_attention(q[:, :, start:stop], k[:, :, :n], v[:, :, :n], attn_mask=cast(m),
                                           is_causal=m is None, enable_gqa=gqa)
            for start, stop, n, m in plan.chunks], dim=2)
    if plan.rows is not None:
        return torch.cat([
            F.scaled_dot_product_attention(q[b:b + 1], k[b:b + 1, :, :e], v[b:b + 1, :, :e], attn_mask=m, enable_gqa=gqa)
            for b, (e, m) in enumerate(plan.rows)])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=cast(plan.mask), is_causal=plan.causal, enable_gqa=gqa)
