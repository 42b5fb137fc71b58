"""Beam search against transformers' `generate(num_beams=...)` on tiny random Llama and GPT-2.

Tokens must be identical and `Beam.score` must equal `sequences_scores` within 1e-5 relative (the
scores reach ~100 in magnitude, where one float32 ulp is ~1e-5; the two models' logits differ by
~1e-6). The stop id is the third token of a greedy run, so some beams end on it early and others run
to the length limit.
"""

from __future__ import annotations

import math

import pytest
import torch

from llmos.engine.beam import Beam, beam_search
from llmos.engine.generate import Generation
from llmos.engine.sampling import SamplingParams
from llmos.errors import LlmosError

PROMPT = [5, 17, 99, 3, 120, 42]
MAX_NEW = 12

# (num_beams, length_penalty, early_stopping, num_return_sequences, with a stop id, extra controls)
CASES = [
    (4, 1.0, False, 4, True, {}),
    (4, 1.0, True, 4, True, {}),
    (4, 1.0, "never", 4, True, {}),
    (3, 2.0, "never", 3, True, {}),
    (3, -0.5, "never", 2, True, {}),
    (2, 0.0, False, 2, True, {}),
    (4, 0.5, True, 1, True, {}),
    (5, 1.0, False, 3, False, {}),  # no stop id: every hypothesis runs to max_new_tokens
    (3, -1.0, True, 3, False, {}),
    (4, 1.0, False, 4, True, {"repetition_penalty": 1.3}),
    (4, 1.0, "never", 4, True, {"no_repeat_ngram_size": 2}),
    (4, 1.0, False, 4, True, {"min_new_tokens": 5}),
    (3, 1.0, True, 3, True, {"logit_bias": {7: 3.0, 11: -2.5}}),
]


def stop_id(model) -> int:
    return list(Generation(model, PROMPT, max_new_tokens=3).tokens())[2]


def reference(ref, eos: int | None, num_beams, length_penalty, early_stopping, num_return_sequences, extra):
    """transformers' beams as (tokens without the stop id, score, finish reason)."""
    kw = {}
    if "repetition_penalty" in extra:
        kw["repetition_penalty"] = extra["repetition_penalty"]
    if "no_repeat_ngram_size" in extra:
        kw["no_repeat_ngram_size"] = extra["no_repeat_ngram_size"]
    if "min_new_tokens" in extra:
        kw["min_new_tokens"] = extra["min_new_tokens"]
    if "logit_bias" in extra:
        kw["sequence_bias"] = {(t,): b for t, b in extra["logit_bias"].items()}
    with torch.no_grad():
        out = ref.generate(
            torch.tensor([PROMPT]), num_beams=num_beams, max_new_tokens=MAX_NEW, length_penalty=length_penalty,
            early_stopping=early_stopping, num_return_sequences=num_return_sequences, do_sample=False,
            eos_token_id=eos, pad_token_id=eos if eos is not None else 0, return_dict_in_generate=True,
            output_scores=True, **kw,
        )
    beams = []
    for seq, score in zip(out.sequences[:, len(PROMPT):].tolist(), out.sequences_scores.tolist()):
        if eos is not None and eos in seq:  # the stop id, then padding (also the stop id)
            beams.append((seq[:seq.index(eos)], score, "eos"))
        else:
            assert len(seq) == MAX_NEW
            beams.append((seq, score, "length"))
    return beams


_RESULTS: dict[tuple, list[Beam]] = {}


def ours(model, eos, num_beams, length_penalty, early_stopping, num_return_sequences, extra) -> list[Beam]:
    key = (id(model), eos, num_beams, length_penalty, early_stopping, num_return_sequences, repr(extra))
    if key not in _RESULTS:
        _RESULTS[key] = _run(model, eos, num_beams, length_penalty, early_stopping, num_return_sequences, extra)
    return _RESULTS[key]


def _run(model, eos, num_beams, length_penalty, early_stopping, num_return_sequences, extra) -> list[Beam]:
    extra = dict(extra)
    min_new = extra.pop("min_new_tokens", 0)
    return beam_search(
        model, PROMPT, num_beams=num_beams, max_new_tokens=MAX_NEW, length_penalty=length_penalty,
        early_stopping=early_stopping, num_return_sequences=num_return_sequences,
        stop_ids=frozenset() if eos is None else frozenset({eos}), params=SamplingParams(temperature=0.0, **extra),
        min_new_tokens=min_new,
    )


def case_id(case) -> str:
    k, lp, es, r, eos, extra = case
    return f"k{k}-lp{lp}-es{es}-r{r}-{'eos' if eos else 'noeos'}" + "".join(f"-{n}" for n in extra)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_beam_search_matches_transformers(tiny_pair, case):
    kind, ref, model = tiny_pair
    k, lp, es, r, with_eos, extra = case
    eos = stop_id(model) if with_eos else None
    expected = reference(ref, eos, k, lp, es, r, extra)
    got = ours(model, eos, k, lp, es, r, extra)
    assert [b.tokens for b in got] == [e[0] for e in expected], kind
    assert [b.finish_reason for b in got] == [e[2] for e in expected], kind
    for b, e in zip(got, expected):
        assert math.isclose(b.score, e[1], rel_tol=1e-5, abs_tol=1e-5), (kind, b.score, e[1])


def test_stop_ids_are_exercised(tiny_pair):
    """The grid above is only a test of EOS handling if some beams end on the stop id, early."""
    kind, _, model = tiny_pair
    reasons, shortest = set(), MAX_NEW
    for k, lp, es, r, with_eos, extra in CASES:
        if with_eos:
            beams = ours(model, stop_id(model), k, lp, es, r, extra)
            reasons |= {b.finish_reason for b in beams}
            shortest = min([shortest] + [len(b.tokens) for b in beams if b.finish_reason == "eos"])
    assert reasons == {"eos", "length"}, kind
    assert shortest < MAX_NEW // 2, kind


def test_scores_sorted_and_counted(tiny_pair):
    _, _, model = tiny_pair
    beams = beam_search(model, PROMPT, num_beams=5, max_new_tokens=8, num_return_sequences=5,
                        stop_ids=frozenset({stop_id(model)}))
    assert len(beams) == 5
    assert [b.score for b in beams] == sorted((b.score for b in beams), reverse=True)
    assert len({tuple(b.tokens) for b in beams}) == 5  # distinct hypotheses


def test_one_beam_with_early_stopping_is_greedy(tiny_pair):
    """One beam that stops as soon as a hypothesis finishes follows the argmax at every step."""
    _, _, model = tiny_pair
    greedy = list(Generation(model, PROMPT, max_new_tokens=MAX_NEW).tokens())
    beam = beam_search(model, PROMPT, num_beams=1, max_new_tokens=MAX_NEW, early_stopping=True)[0]
    assert beam.tokens == greedy
    # The score is the mean log-probability of the greedy tokens (length_penalty 1).
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT + greedy]), torch.arange(len(PROMPT) + MAX_NEW))[0]
    lp = logits[len(PROMPT) - 1:-1].float().log_softmax(-1).gather(-1, torch.tensor(greedy)[:, None]).sum()
    assert math.isclose(beam.score, lp.item() / MAX_NEW, rel_tol=1e-5)


def test_sampling_controls_are_ignored(tiny_llama):
    """As with transformers' do_sample=False: temperature/top-k/top-p/min-p do not change beams."""
    _, model = tiny_llama
    plain = beam_search(model, PROMPT, num_beams=3, max_new_tokens=6, num_return_sequences=3)
    warped = beam_search(model, PROMPT, num_beams=3, max_new_tokens=6, num_return_sequences=3,
                         params=SamplingParams(temperature=0.8, top_k=40, top_p=0.95, min_p=0.1))
    assert warped == plain


def test_presence_penalty_changes_beams(tiny_llama):
    """presence/frequency penalties (OpenAI's, over generated tokens) do apply to beam search."""
    _, model = tiny_llama
    plain = beam_search(model, PROMPT, num_beams=3, max_new_tokens=10)[0]
    penalised = beam_search(model, PROMPT, num_beams=3, max_new_tokens=10,
                            params=SamplingParams(temperature=0.0, presence_penalty=2.0, frequency_penalty=2.0))[0]
    assert penalised.tokens != plain.tokens
    assert len(set(penalised.tokens)) >= len(set(plain.tokens))


def test_beam_rows_share_one_prefill(tiny_pair, monkeypatch):
    """The prompt is prefilled once at batch 1; every later forward is one token for all beams."""
    _, _, model = tiny_pair
    shapes = []
    original = model.hidden

    def spy(tokens, positions, cache=None):
        shapes.append(tuple(tokens.shape))
        return original(tokens, positions, cache)

    monkeypatch.setattr(model, "hidden", spy)
    monkeypatch.setenv("LLMOS_NATIVE", "0")  # the Python step, whose forwards the spy sees
    beam_search(model, PROMPT, num_beams=4, max_new_tokens=6)
    assert shapes[0] == (1, len(PROMPT))
    assert shapes[1:] == [(4, 1)] * 5


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(num_beams=0), "num_beams"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(num_return_sequences=5), "num_return_sequences"),
        (dict(length_penalty=float("nan")), "length_penalty"),
        (dict(early_stopping="sometimes"), "early_stopping"),
        (dict(min_new_tokens=99), "min_new_tokens"),
        (dict(max_new_tokens=500), "context"),
    ],
)
def test_bad_arguments(tiny_llama, kwargs, name):
    _, model = tiny_llama
    args = dict(num_beams=4, max_new_tokens=4) | kwargs
    with pytest.raises(ValueError, match=name):
        beam_search(model, PROMPT, **args)
    with pytest.raises(LlmosError):
        beam_search(model, [], num_beams=2, max_new_tokens=2)
