"""Found by the schema fuzzer: a denormal temperature or repetition penalty divided logits into +inf,
softmax made NaN of them and sampling raised (a 500). Such values now act as their limits do."""

from __future__ import annotations

import torch

from llmos.engine.sampling import SamplingParams, process, sample


def test_denormal_temperature_and_penalty_sample_like_their_limits():
    torch.manual_seed(0)
    logits = torch.randn(3, 64)
    history = torch.arange(8).expand(3, 8)
    gen = torch.Generator().manual_seed(0)
    cold = SamplingParams(temperature=5e-324)
    assert torch.equal(sample(process(logits, cold, history), cold, gen), logits.argmax(-1))  # temperature -> 0: greedy
    harsh = SamplingParams(temperature=1.0, top_p=0.5, repetition_penalty=5e-324)
    out = process(logits, harsh, history)
    assert not out.isnan().any()
    token = sample(out, harsh, gen)
    assert all(0 <= int(t) < 64 for t in token)


def test_a_denormal_penalty_with_a_temperature_still_samples():
    logits = torch.randn(2, 64)
    params = SamplingParams(temperature=0.2, top_p=0.9, repetition_penalty=5e-324)
    out = process(logits, params, torch.arange(8).expand(2, 8))
    assert not out.isnan().any() and not (out == float("inf")).any()
    assert sample(out, params, torch.Generator().manual_seed(0)).shape == (2,)
