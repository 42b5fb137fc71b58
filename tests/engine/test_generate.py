"""Invariants of the decode loop (`Generation`) on a tiny random Llama.

Cached-vs-uncached logits are checked per family in tests/models/test_hf_parity.py; here: seeded
reproducibility with several rows, stop ids held back by min_new_tokens, the max_new_tokens=0 edge,
and a reused KV cache prefix giving the same tokens as a fresh run.
"""

from __future__ import annotations

import pytest
import torch

from llmos.engine.generate import Generation
from llmos.engine.sampling import SamplingParams
from llmos.models.kv_cache import KVCache

PROMPT = [1, 2, 3, 4]


def greedy(model, prompt=PROMPT, n=12) -> list[int]:
    return list(Generation(model, prompt, max_new_tokens=n).tokens())


def test_rows_with_the_same_seed_are_reproducible(tiny_llama):
    _, model = tiny_llama
    params = SamplingParams(temperature=1.0, top_k=50)

    def run(seed: int) -> list[list[int | None]]:
        return list(Generation(model, PROMPT, max_new_tokens=10, params=params, n=3, seed=seed))

    first = run(11)
    assert first == run(11)
    rows = [tuple(step[r] for step in first) for r in range(3)]
    assert len(set(rows)) > 1  # rows are independent draws, not copies of one
    assert run(12) != first


def test_min_new_tokens_holds_back_stop_ids(tiny_llama):
    _, model = tiny_llama
    stop = greedy(model)[0]  # the token greedy decoding would pick first
    ended = Generation(model, PROMPT, max_new_tokens=8, stop_ids=frozenset({stop}))
    assert list(ended.tokens()) == []
    assert ended.finish_reasons == ["eos"] and ended.stop_tokens == [stop]

    held = Generation(model, PROMPT, max_new_tokens=8, stop_ids=frozenset({stop}), min_new_tokens=5)
    tokens = list(held.tokens())
    assert len(tokens) >= 5 and stop not in tokens[:5]
    # With the stop id banned for 5 steps, the first step takes the runner-up.
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT]), torch.arange(len(PROMPT)))[0, -1]
    assert tokens[0] == logits.topk(2).indices[1].item()


def test_min_new_tokens_bans_stop_ids_before_top_k(tiny_llama):
    _, model = tiny_llama
    stop = greedy(model)[0]
    gen = Generation(model, PROMPT, max_new_tokens=4, params=SamplingParams(top_k=1), stop_ids=frozenset({stop}),
                     min_new_tokens=2, seed=0)
    tokens = list(gen.tokens())
    # top_k=1 among the allowed tokens is greedy with the stop id banned.
    assert tokens[:2] == list(Generation(model, PROMPT, max_new_tokens=2, stop_ids=frozenset({stop}),
                                         min_new_tokens=2).tokens())


def test_max_new_tokens_zero(tiny_llama):
    _, model = tiny_llama
    gen = Generation(model, PROMPT, max_new_tokens=0, n=2)
    assert list(gen) == []
    assert gen.finish_reasons == ["length", "length"] and gen.generated == 0


def test_reused_cache_prefix_equals_fresh(tiny_llama):
    """A second call that keeps the first call's cache prefills only the new tokens, with the same result."""
    _, model = tiny_llama
    cache = KVCache.for_model(model.config, 1, 64)
    first = Generation(model, PROMPT, max_new_tokens=6, cache=cache)
    reply = list(first.tokens())
    follow = PROMPT + reply + [7, 8, 9]
    # The last reply token was sampled but never run, so the cache holds one position less.
    assert cache.length == len(PROMPT) + len(reply) - 1
    reused = Generation(model, follow, max_new_tokens=6, cache=cache, cached=cache.length)
    assert reused.cache is cache
    assert list(reused.tokens()) == greedy(model, follow, 6)
