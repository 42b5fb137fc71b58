"""Sampling controls against transformers' own logits processors, plus property tests.

Each llmos function is compared with the transformers processor or warper that defines the control,
on random logits (B=3, V=50..1000, some with ties), and must give the identical tensor (-inf where
transformers puts -inf). Where the two used to differ, llmos now follows transformers:

- top-p: llmos computed "drop a token when the mass of the tokens before it reaches p" on a
  descending sort; transformers drops "cumulative mass from the least likely up to this token
  <= 1 - p" on an ascending sort. Equal in exact arithmetic, but float32 rounding and the order of
  tied logits made them disagree at the boundary; llmos now uses transformers' computation.
- min_new_tokens: transformers bans stop ids before temperature/top-k/top-p/min-p, so the warpers
  choose among allowed tokens; `process(..., suppress=ids)` does the same (see test_generate.py).

logit_bias is compared with transformers' SequenceBiasLogitsProcessor restricted to single tokens.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.generation import logits_process as lp

from llmos.engine.generate import Generation
from llmos.engine.sampling import (
    SamplingParams,
    apply_logit_bias,
    apply_min_p,
    apply_presence_frequency,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    process,
    sample,
)

B = 3
FAST = settings(max_examples=40, deadline=None)


def random_logits(seed: int, vocab: int, ties: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, vocab, generator=g) * 3.0
    if ties:  # coarse values: many exact ties, including around every cut-off
        logits = (logits * 2).round() / 2
    return logits


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical, with -inf == -inf."""
    return a.shape == b.shape and torch.equal(a, b)


logit_cases = st.tuples(st.integers(0, 2**31), st.integers(50, 1000), st.booleans())
no_ids = torch.empty(B, 0, dtype=torch.long)


# --- parity with transformers' processors and warpers --------------------------------------------

@FAST
@given(logit_cases, st.floats(0.05, 5.0))
def test_temperature_matches(case, t):
    logits = random_logits(*case)
    expected = lp.TemperatureLogitsWarper(float(t))(no_ids, logits.clone())
    assert same(process(logits, SamplingParams(temperature=t)), expected)


@FAST
@given(logit_cases, st.integers(1, 1200))
def test_top_k_matches(case, k):
    logits = random_logits(*case)
    expected = lp.TopKLogitsWarper(k)(no_ids, logits.clone())
    assert same(apply_top_k(logits, k), expected)
    assert same(process(logits, SamplingParams(top_k=k)), expected)


@FAST
@given(logit_cases, st.floats(0.01, 0.99))
def test_top_p_matches(case, p):
    logits = random_logits(*case)
    expected = lp.TopPLogitsWarper(p)(no_ids, logits.clone())
    assert same(apply_top_p(logits, p), expected)
    assert same(process(logits, SamplingParams(top_p=p)), expected)


@FAST
@given(logit_cases, st.floats(0.0, 1.0))
def test_min_p_matches(case, min_p):
    logits = random_logits(*case)
    expected = lp.MinPLogitsWarper(min_p)(no_ids, logits.clone())
    assert same(apply_min_p(logits, min_p), expected)


@FAST
@given(logit_cases, st.floats(0.1, 3.0), st.integers(1, 40))
def test_repetition_penalty_matches(case, penalty, n):
    logits = random_logits(*case)
    history = torch.randint(0, logits.shape[-1], (B, n), generator=torch.Generator().manual_seed(case[0]))
    expected = lp.RepetitionPenaltyLogitsProcessor(float(penalty))(history, logits.clone())
    assert same(apply_repetition_penalty(logits, history, penalty), expected)
    assert same(process(logits, SamplingParams(repetition_penalty=penalty), history), expected)


@FAST
@given(logit_cases, st.integers(1, 4), st.integers(0, 30), st.integers(2, 6))
def test_no_repeat_ngram_matches(case, n, length, alphabet):
    logits = random_logits(*case)
    # A small alphabet so n-grams repeat often.
    history = torch.randint(0, alphabet, (B, length), generator=torch.Generator().manual_seed(case[0]))
    expected = lp.NoRepeatNGramLogitsProcessor(n)(history, logits.clone())
    assert same(process(logits, SamplingParams(temperature=0.0, no_repeat_ngram_size=n), history), expected)


@FAST
@given(logit_cases, st.dictionaries(st.integers(0, 49), st.floats(-50, 50), min_size=1, max_size=10))
def test_logit_bias_matches_sequence_bias(case, bias):
    logits = random_logits(*case)
    expected = lp.SequenceBiasLogitsProcessor({(t,): float(b) for t, b in bias.items()})(no_ids, logits.clone())
    assert same(apply_logit_bias(logits, bias), expected)
    assert same(process(logits, SamplingParams(temperature=0.0, logit_bias=bias)), expected)


@FAST
@given(logit_cases, st.integers(0, 8), st.integers(0, 8), st.lists(st.integers(0, 49), min_size=1, max_size=3))
def test_min_new_tokens_matches(case, step, min_new, stop):
    logits = random_logits(*case)
    prompt_len = 5
    ids = torch.zeros(B, prompt_len + step, dtype=torch.long)
    expected = lp.MinNewTokensLengthLogitsProcessor(prompt_len, min_new, stop)(ids, logits.clone())
    suppress = torch.tensor(stop) if step < min_new else None
    assert same(process(logits, SamplingParams(temperature=0.0), suppress=suppress), expected)


@FAST
@given(
    logit_cases,
    st.floats(0.3, 2.0),
    st.integers(0, 60),
    st.floats(0.05, 1.0),
    st.floats(0.0, 0.5),
    st.floats(0.5, 2.0),
    st.integers(0, 3),
)
def test_whole_pipeline_matches_generate_order(case, t, k, p, min_p, penalty, ngram):
    """process() applies the controls in the order transformers' generate() builds its list."""
    logits = random_logits(*case)
    history = torch.randint(0, 8, (B, 20), generator=torch.Generator().manual_seed(case[0]))
    bias = {3: 1.5, 7: -2.0}
    stop = [1, 2]
    procs = lp.LogitsProcessorList([lp.SequenceBiasLogitsProcessor({(i,): b for i, b in bias.items()})])
    if penalty != 1.0:
        procs.append(lp.RepetitionPenaltyLogitsProcessor(float(penalty)))
    if ngram:
        procs.append(lp.NoRepeatNGramLogitsProcessor(ngram))
    procs.append(lp.MinNewTokensLengthLogitsProcessor(10, 15, stop))  # 20 - 10 < 15: stop ids banned
    if t != 1.0:
        procs.append(lp.TemperatureLogitsWarper(float(t)))
    if k:
        procs.append(lp.TopKLogitsWarper(k))
    if p < 1.0:
        procs.append(lp.TopPLogitsWarper(p))
    procs.append(lp.MinPLogitsWarper(min_p))
    expected = procs(history, logits.clone())
    params = SamplingParams(temperature=t, top_k=k, top_p=p, min_p=min_p, repetition_penalty=penalty,
                            no_repeat_ngram_size=ngram, logit_bias=bias)
    assert same(process(logits, params, history, suppress=torch.tensor(stop)), expected)


# --- greedy generation with penalties equals transformers' generate ------------------------------

@pytest.mark.parametrize("controls", [
    {"repetition_penalty": 1.3},
    {"no_repeat_ngram_size": 2},
    {"repetition_penalty": 1.3, "no_repeat_ngram_size": 3},
])
def test_greedy_with_penalties_matches_generate(tiny_llama, controls):
    ref, model = tiny_llama
    prompt = [1, 2, 3, 4]  # plain greedy falls into "23 23 23 ..." here: the penalties must act
    with torch.no_grad():
        expected = ref.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=24, min_new_tokens=24,
                                pad_token_id=0, **controls)[0, len(prompt):].tolist()
    got = list(Generation(model, prompt, max_new_tokens=24, params=SamplingParams(temperature=0.0, **controls)).tokens())
    plain = list(Generation(model, prompt, max_new_tokens=24).tokens())
    assert got == expected
    assert got != plain  # the control changed something, so the comparison means something


# --- properties --------------------------------------------------------------------------------

logit_lists = st.lists(st.floats(-20, 20, allow_nan=False, width=32), min_size=2, max_size=64)


@FAST
@given(logit_lists, st.data())
def test_top_k_never_outside_k_largest(values, data):
    k = data.draw(st.integers(1, len(values)))
    logits = torch.tensor([values])
    kth = sorted(values, reverse=True)[k - 1]
    kept = torch.isfinite(apply_top_k(logits, k))[0]
    assert all(v >= kth for v, keep in zip(values, kept.tolist()) if keep)
    assert all(keep for v, keep in zip(values, kept.tolist()) if v > kth)  # the k largest all stay
    draws = sample(process(logits.expand(16, -1), SamplingParams(top_k=k)), SamplingParams(top_k=k),
                   torch.Generator().manual_seed(len(values)))
    assert all(values[i] >= kth for i in draws.tolist())


@FAST
@given(logit_lists, st.floats(0.01, 1.0))
def test_top_p_keeps_smallest_set_reaching_p(values, p):
    logits = torch.tensor([values])
    probs = logits.softmax(-1)[0].double()
    kept = torch.isfinite(apply_top_p(logits, p))[0]
    kept_probs, dropped_probs = probs[kept], probs[~kept]
    eps = 1e-5
    assert kept.any()
    if dropped_probs.numel():
        assert kept_probs.min() >= dropped_probs.max()  # the most likely tokens, in order
    assert kept_probs.sum() >= p - eps  # reaches p ...
    assert kept_probs.sum() - kept_probs.min() < p + eps  # ... and no smaller prefix does


@FAST
@given(logit_lists)
def test_temperature_zero_is_argmax(values):
    logits = torch.tensor([values, values[::-1]])
    greedy = SamplingParams(temperature=0.0)
    assert torch.equal(sample(process(logits, greedy), greedy), logits.argmax(-1))


def test_temperature_zero_generation_is_argmax(tiny_llama):
    _, model = tiny_llama
    prompt = [9, 8, 7, 6]
    tokens = list(Generation(model, prompt, max_new_tokens=10).tokens())
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens]), torch.arange(len(prompt) + 10))[0]
    assert tokens == logits[len(prompt) - 1:-1].argmax(-1).tolist()


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2**63 - 1), st.floats(0.5, 1.5), st.integers(0, 50), st.floats(0.5, 1.0))
def test_same_seed_same_tokens(tiny_llama, seed, t, k, p):
    _, model = tiny_llama
    params = SamplingParams(temperature=t, top_k=k, top_p=p)

    def run() -> list[list[int | None]]:
        return list(Generation(model, [1, 2, 3], max_new_tokens=8, params=params, n=2, seed=seed))

    assert run() == run()


@FAST
@given(logit_lists, st.floats(0.0, 1.0))
def test_min_p_never_drops_top_token(values, min_p):
    logits = torch.tensor([values])
    out = apply_min_p(logits, min_p)
    assert torch.isfinite(out[0, logits.argmax(-1)]).all()
    probs = logits.softmax(-1)
    assert torch.equal(torch.isfinite(out), probs >= min_p * probs.max())


@FAST
@given(
    st.lists(st.lists(st.integers(0, 9), min_size=0, max_size=12), min_size=1, max_size=3).filter(
        lambda rows: len({len(r) for r in rows}) == 1),
    st.floats(-2, 2),
    st.floats(-2, 2),
)
def test_presence_frequency_follow_openai(rows, presence, frequency):
    """OpenAI: logit[t] -= count[t] * frequency_penalty + (count[t] > 0) * presence_penalty."""
    logits = torch.randn(len(rows), 10, generator=torch.Generator().manual_seed(len(rows[0])))
    output = torch.tensor(rows, dtype=torch.long).reshape(len(rows), -1)
    got = apply_presence_frequency(logits, output, presence, frequency)
    for b, row in enumerate(rows):
        counts = Counter(row)
        for t in range(10):
            want = logits[b, t].item() - counts[t] * frequency - (counts[t] > 0) * presence
            assert math.isclose(got[b, t].item(), want, abs_tol=1e-5)
    if any(rows[0]) and (presence or frequency):
        params = SamplingParams(presence_penalty=presence, frequency_penalty=frequency, temperature=0.0)
        assert torch.equal(process(logits, params, output=output), got)


# --- bad arguments -----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -0.5}, "temperature must be a finite number >= 0"),
    ({"temperature": float("nan")}, "temperature must be a finite number >= 0"),
    ({"temperature": float("inf")}, "temperature must be a finite number >= 0"),
    ({"temperature": "hot"}, "temperature must be"),
    ({"top_p": 0.0}, r"top_p must be a number in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p must be a number in \(0, 1\]"),
    ({"top_p": float("nan")}, r"top_p must be a number in \(0, 1\]"),
    ({"top_k": -1}, "top_k must be an integer >= 0"),
    ({"top_k": 2.5}, "top_k must be an integer >= 0"),
    ({"top_k": True}, "top_k must be an integer >= 0"),
    ({"min_p": 2.0}, r"min_p must be a number in \[0, 1\]"),
    ({"min_p": -0.1}, r"min_p must be a number in \[0, 1\]"),
    ({"repetition_penalty": 0.0}, "repetition_penalty must be a finite number > 0"),
    ({"repetition_penalty": -1.0}, "repetition_penalty must be a finite number > 0"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty must be a finite number > 0"),
    ({"presence_penalty": 2.5}, r"presence_penalty must be a number in \[-2, 2\]"),
    ({"frequency_penalty": -3.0}, r"frequency_penalty must be a number in \[-2, 2\]"),
    ({"no_repeat_ngram_size": -1}, "no_repeat_ngram_size must be an integer >= 0"),
    ({"logit_bias": {-1: 1.0}}, "logit_bias keys must be token ids"),
    ({"logit_bias": {"5": 1.0}}, "logit_bias keys must be token ids"),
    ({"logit_bias": {5: float("nan")}}, "logit_bias values must be finite"),
    ({"logit_bias": {5: float("inf")}}, "logit_bias values must be finite"),
])
def test_bad_arguments_name_the_argument_and_range(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_edges_that_are_allowed():
    SamplingParams(temperature=0, top_p=1, top_k=0, min_p=0, repetition_penalty=1)  # ints are numbers
    SamplingParams(top_p=1e-9, min_p=1.0, logit_bias={5: -math.inf})  # -inf bans a token


def test_logit_bias_outside_vocabulary():
    with pytest.raises(ValueError, match=r"logit_bias token ids must be in \[0, 49\]"):
        apply_logit_bias(torch.zeros(1, 50), {50: 1.0})
