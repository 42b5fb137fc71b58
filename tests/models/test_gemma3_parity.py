"""Gemma 3 parity with transformers on tiny random configs, through the production loader.

A Gemma3TextConfig saved with `save_pretrained` and loaded from the folder by llmos: fp32 logits within
1e-4 and the same 32 greedy tokens. The prompt (40 tokens) is longer than the sliding window (16), the
layer pattern puts sliding and global layers in one model, the head size is not dim / n_heads,
query_pre_attn_scalar is not the head size, the two RoPE bases differ and the global one is scaled: a
mistake in any of these moves the logits.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from llmos.engine.generate import Generation
from llmos.engine.sampling import SamplingParams
from hf_reference import cached_vs_full, hf_greedy, llmos_greedy, reference, saved_and_loaded

WINDOW = 16
CONFIGS = {
    # layers 0, 1 sliding, 2 global, 3 sliding (pattern 3), GQA 4:2, head 32 with dim 48
    "gemma3": dict(layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
                   num_key_value_heads=2, query_pre_attn_scalar=24,
                   rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 50000.0},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}}),
    # as Gemma 3 270M is shaped: one KV head, query_pre_attn_scalar = head size, the old-style keys
    "gemma3-270m-shape": dict(sliding_window_pattern=2, num_key_value_heads=1, query_pre_attn_scalar=32),
}


def _reference(kind: str):
    config = transformers.Gemma3TextConfig(
        vocab_size=256, hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        head_dim=32, max_position_embeddings=256, sliding_window=WINDOW, **CONFIGS[kind])
    # Norm weights start at zero (a multiplier of 1): give them values so a missed "+1" shows.
    return reference(config, noise=0.3)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    ref = _reference(request.param)
    return request.param, ref, *saved_and_loaded(ref, tmp_path_factory.mktemp(request.param))


def test_config_reads_the_layer_kinds(pair):
    kind, ref, _, config = pair
    assert config.arch == "gemma3"
    assert list(config.layer_types) == list(ref.config.layer_types)
    assert {"sliding_attention", "full_attention"} == set(config.layer_types)
    assert config.sliding_window == WINDOW


def test_logits_match(pair):
    kind, ref, model, _ = pair
    torch.manual_seed(1)
    tokens = torch.randint(0, 256, (2, 40))  # 40 > the window of 16
    with torch.no_grad():
        expected = ref(tokens).logits
        got = model(tokens, torch.arange(40))
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-4, kind


def test_window_matters(pair):
    """The check above would not see a wrong window if the window changed nothing: it does."""
    kind, ref, model, config = pair
    torch.manual_seed(1)
    tokens = torch.randint(0, 256, (1, 40))
    with torch.no_grad():
        got = model(tokens, torch.arange(40))
        object.__setattr__(model.config, "sliding_window", None)
        try:
            unwindowed = model(tokens, torch.arange(40))
        finally:
            object.__setattr__(model.config, "sliding_window", WINDOW)
    assert (got[:, WINDOW:] - unwindowed[:, WINDOW:]).abs().max().item() > 1e-3
    assert (got[:, :WINDOW] - unwindowed[:, :WINDOW]).abs().max().item() < 1e-5


def test_greedy_32_tokens_match(pair):
    kind, ref, model, _ = pair
    prompt = [5, 17, 99, 3, 250, 42, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]  # past the window by the end
    assert llmos_greedy(model, prompt, 32) == hf_greedy(ref, prompt, 32), kind


def test_cached_decode_equals_uncached(pair):
    """Token by token through the KV cache, past the window: each step's logits equal the full forward's."""
    kind, _, model, config = pair
    assert cached_vs_full(model, config, 40) < 1e-4, kind


def test_batch_engine_and_beams_run_gemma(pair):
    """The continuous-batching engine (per-row positions, rows at different lengths, past the window)
    gives each request the greedy tokens it gets alone; beam search with one beam is greedy."""
    from llmos.engine.batch import BatchEngine, Request
    from llmos.engine.beam import beam_search

    kind, _, model, _ = pair
    prompts = [[5, 17, 99, 3] * 5, [7, 8, 9], [250, 42] * 6]
    alone = [list(Generation(model, p, max_new_tokens=24, params=SamplingParams(temperature=0.0)).tokens())
             for p in prompts]
    done = BatchEngine(model, max_batch=4, max_len=64).run(
        [Request(prompt=p, max_new_tokens=24, min_new_tokens=24) for p in prompts])
    assert [r.output for r in done] == alone, kind
    beams = beam_search(model, prompts[0], num_beams=1, max_new_tokens=8)
    assert list(beams[0].tokens)[:8] == alone[0][:8]
