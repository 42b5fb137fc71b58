"""Attention plans: the chunked path for long prompts equals one causal (or masked) attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmos.models import attention


def _qkv(T: int, S: int):
    torch.manual_seed(0)
    return torch.randn(1, 6, T, 32), torch.randn(1, 2, S, 32), torch.randn(1, 2, S, 32)


@torch.inference_mode()
def test_long_prompt_runs_in_query_chunks_with_the_same_result():
    T = 300  # four full chunks and a partial one
    q, k, v = _qkv(T, T)
    how = attention.plan(torch.arange(T), T)
    assert how.chunks is not None and len(how.chunks) == 5
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert (attention.attend(q, k, v, how) - want).abs().max().item() < 1e-5


@torch.inference_mode()
def test_chunks_after_cached_positions_match_the_masked_attention():
    start, T = 50, 200  # a prompt continuing a cached prefix: keys 0..249
    q, k, v = _qkv(T, start + T)
    positions = torch.arange(start, start + T)
    how = attention.plan(positions, start + T)
    assert how.chunks is not None and all(m is not None for *_, m in how.chunks)
    mask = attention.attention_mask(positions, start + T, None)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert (attention.attend(q, k, v, how) - want).abs().max().item() < 1e-5


def test_training_keeps_one_causal_attention():
    with torch.enable_grad():
        assert attention.plan(torch.arange(256), 256).causal


def test_a_window_no_key_has_left_plans_plain_causal_attention():
    """Queries at positions below the window see every earlier key: no mask, so the causal kernel and the
    query chunks serve a sliding layer's prompt; from the first position a key leaves, the mask is back."""
    within = attention.plan(torch.arange(40), 40, window=40)
    assert within.causal and within.mask is None
    past = attention.plan(torch.arange(41), 41, window=40)  # position 40 no longer sees key 0
    assert past.mask is not None and not bool(past.mask[40, 0] == 0)
    rows = attention.plan(torch.tensor([[5], [39]]), 40, window=40)
    assert all(mask is None for _, mask in rows.rows)
