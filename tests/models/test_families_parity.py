"""Gemma 2, Gemma 3, Qwen3 and Phi-3 against transformers on tiny random configs, through the production loader.

Shaped like test_hf_parity.py: each config is saved with `save_pretrained` and loaded by llmos from the
folder; fp32 logits agree within 1e-4 over a prompt and greedy decoding gives the same 32 tokens. The
configs make each family's own parts matter: Gemma 2's prompts are longer than its sliding window and
its soft-caps are small enough to bind; Gemma 3 mixes sliding and global layers with their own RoPE
bases (the global one scaled); Qwen3's head size differs from dim / heads; Phi-3's prompts run past
original_max_position_embeddings, so LongRoPE's long factors (and its attention factor) are used.
test_gemma3_parity.py has Gemma 3's own cases; this config is the one the format tests
(test_families_formats.py) export and fine-tune.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from llmos.engine.generate import Generation, prefill
from llmos.engine.sampling import SamplingParams
from llmos.models.kv_cache import KVCache
import hf_reference

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
            num_attention_heads=4, max_position_embeddings=128)
WINDOW, ORIGINAL = 8, 32


def _longrope(n: int) -> dict:
    return {"rope_type": "longrope", "short_factor": [1.0 + 0.05 * i for i in range(n)],
            "long_factor": [1.0 + 0.7 * i for i in range(n)]}


CONFIGS = {
    "gemma2": lambda: transformers.Gemma2Config(**TINY, num_key_value_heads=2, head_dim=24, sliding_window=WINDOW,
                                                query_pre_attn_scalar=20, attn_logit_softcapping=2.0,
                                                final_logit_softcapping=3.0),
    "gemma3": lambda: transformers.Gemma3TextConfig(
        **TINY, num_key_value_heads=2, head_dim=24, sliding_window=WINDOW, query_pre_attn_scalar=20,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 50000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}}),
    "qwen3": lambda: transformers.Qwen3Config(**TINY, num_key_value_heads=2, head_dim=24, tie_word_embeddings=False),
    "qwen3-tied": lambda: transformers.Qwen3Config(**TINY, num_key_value_heads=1, tie_word_embeddings=True),
    "phi3-longrope": lambda: transformers.Phi3Config(**{**TINY, "max_position_embeddings": 256}, num_key_value_heads=2,
                                                     original_max_position_embeddings=ORIGINAL, rope_scaling=_longrope(8),
                                                     pad_token_id=0, bos_token_id=1, eos_token_id=2),
    # Phi-4-mini's shape: half of each head rotated; plus a sliding window over every layer
    "phi3-partial": lambda: transformers.Phi3Config(**{**TINY, "max_position_embeddings": 256}, num_key_value_heads=1,
                                                    original_max_position_embeddings=ORIGINAL, rope_scaling=_longrope(4),
                                                    partial_rotary_factor=0.5, sliding_window=16,
                                                    pad_token_id=0, bos_token_id=1, eos_token_id=2),
}


def reference(kind: str):
    # norms off their init, so a norm read the wrong way shows; larger weights: logits and attention
    # scores reach the soft-caps
    return hf_reference.reference(CONFIGS[kind](), matrices=4.0)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    ref = reference(request.param)
    return request.param, ref, *hf_reference.saved_and_loaded(ref, tmp_path_factory.mktemp(request.param))


def test_config_reads_the_family(pair):
    kind, _, _, config = pair
    if kind == "gemma2":
        assert config.arch == "gemma2" and config.sliding_window == WINDOW and config.query_pre_attn_scalar == 20
        assert config.layer_types == ("sliding_attention", "full_attention", "sliding_attention")
        assert (config.attn_softcap, config.final_softcap) == (2.0, 3.0) and config.tie_embeddings
    elif kind == "gemma3":
        assert config.arch == "gemma3" and config.sliding_window == WINDOW and config.query_pre_attn_scalar == 20
        assert config.layer_types == ("sliding_attention", "full_attention", "sliding_attention")
        assert (config.rope_theta, config.rope_local_theta) == (50000.0, 1000.0)
        assert config.rope_scaling == {"rope_type": "linear", "factor": 2.0} and config.tie_embeddings
    elif kind.startswith("qwen3"):
        assert config.arch == "llama" and config.qk_norm and not config.qkv_bias
    else:
        assert config.rope_scaling["rope_type"] == "longrope"
        assert config.rope_scaling["original_max_position_embeddings"] == ORIGINAL
        assert config.rope_scaling["attention_factor"] > 1.0  # 256 / 32: cos and sin are scaled
        assert config.rotary_dim == (8 if kind == "phi3-partial" else 16)


def test_logits_match(pair):
    kind, ref, model, _ = pair
    torch.manual_seed(1)
    tokens = torch.randint(0, 256, (2, 40))  # past the window (8, 16) and the original context (32)
    with torch.no_grad():
        expected = ref(tokens).logits
        got = model(tokens, torch.arange(40))
    assert got.shape == expected.shape
    diff = (got - expected).abs().max().item()
    assert diff < 1e-4, (kind, diff)
    if kind == "gemma2":  # both soft-caps bind: without either, the logits are far off
        assert expected.abs().max() > 0.5 * 3.0
        with torch.no_grad():
            assert (model.output(model.hidden(tokens, torch.arange(40))) - expected).abs().max() > 0.1
            for block in model.layers:
                block.attn.cap = None
            uncapped = model(tokens, torch.arange(40))
            for block in model.layers:
                block.attn.cap = 2.0
        assert (uncapped - expected).abs().max() > 0.01


def test_short_prompt_uses_the_short_factors(pair):
    """Below the original context LongRoPE uses the short factors: prompt and 12 new tokens stay below
    it, and transformers agrees on the logits and the tokens."""
    kind, ref, model, _ = pair
    torch.manual_seed(3)
    tokens = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        assert (model(tokens, torch.arange(20)) - ref(tokens).logits).abs().max().item() < 1e-4, kind
    expected = hf_reference.hf_greedy(ref, tokens[0].tolist(), 12)
    got = list(Generation(model, tokens[0].tolist(), max_new_tokens=12, params=SamplingParams(temperature=0.0)).tokens())
    assert got == expected, kind


def test_greedy_32_tokens_match(pair):
    kind, ref, model, _ = pair
    torch.manual_seed(4)
    prompt = torch.randint(0, 256, (40,)).tolist()  # past the window (8, 16) and the original context (32)
    assert hf_reference.llmos_greedy(model, prompt, 32) == hf_reference.hf_greedy(ref, prompt, 32), kind


def test_cached_decode_equals_uncached(pair):
    kind, _, model, config = pair
    assert hf_reference.cached_vs_full(model, config, 24) < 1e-5, kind


def test_prefill_in_chunks_equals_the_whole_prompt(pair):
    """A 40-token prompt prefilled 16 tokens at a time gives transformers' logits for the whole prompt:
    LongRoPE picks its factors by where the prompt ends (past 32), not by where each chunk ends."""
    kind, ref, model, config = pair
    torch.manual_seed(5)
    tokens = torch.randint(0, 256, (1, 40))
    with torch.no_grad():
        expected = ref(tokens).logits[0, -1]
    got = prefill(model, tokens, 0, KVCache.for_model(config, 1, 40), chunk=16)[0]
    assert (got - expected).abs().max().item() < 1e-4, kind


# --- LongRoPE: a generation that passes original_max_position_embeddings mid-way ----------------------

@pytest.fixture(scope="module", params=["phi3-longrope", "phi3-partial"])
def phi3(request, tmp_path_factory):
    ref = reference(request.param)
    return request.param, ref, hf_reference.saved_and_loaded(ref, tmp_path_factory.mktemp(request.param))[0]


def _hf_steps(ref, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """transformers' n greedy tokens and the log-probabilities (n, V) each was picked from."""
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                           max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0,
                           return_dict_in_generate=True, output_logits=True)
    return out.sequences[0, len(prompt):].tolist(), torch.cat(out.logits).log_softmax(dim=-1)


def _llmos_steps(model, prompt: list[int], n: int, **kw) -> tuple[list[int], torch.Tensor]:
    """llmos' n greedy tokens through the engine, and the log-probabilities (n, V) of each step."""
    gen = Generation(model, prompt, max_new_tokens=n, params=SamplingParams(temperature=0.0), logprobs=256, **kw)
    tokens, rows = [], []
    for step in gen:
        tokens.append(step[0])
        _, ids, values = gen.last_logprobs
        rows.append(torch.empty(256).scatter_(0, ids[0], values[0]))  # top-256 of 256: the whole distribution
    return tokens, torch.stack(rows)


def test_generation_crossing_the_original_context_matches(phi3, monkeypatch):
    """A 20-token prompt and 24 new tokens pass the original context (32) at the 13th step, where
    transformers recomputes the whole sequence with the long factors: llmos gives its tokens and
    log-probabilities at every step. Without the restart the steps after the crossing differ."""
    kind, ref, model = phi3
    torch.manual_seed(6)
    prompt = torch.randint(0, 256, (20,)).tolist()
    expected_tokens, expected = _hf_steps(ref, prompt, 24)
    tokens, got = _llmos_steps(model, prompt, 24)
    assert tokens == expected_tokens, kind
    assert (got - expected).abs().max().item() < 1e-4, kind

    from llmos.engine import generate
    monkeypatch.setattr(generate, "restarts", lambda *args: False)  # keys keep their short rotation
    _, stale = _llmos_steps(model, prompt, 24)
    assert (stale[:13] - expected[:13]).abs().max().item() < 1e-4  # up to the crossing: the same
    assert (stale[13:] - expected[13:]).abs().max().item() > 1e-3, kind


def test_cached_history_crossing_the_original_context_starts_over(phi3):
    """A chat turn whose cached history (26 tokens, short rotation) grows past the original context
    gives what the whole conversation gives without a cache (the long rotation throughout)."""
    kind, _, model = phi3
    torch.manual_seed(7)
    history = torch.randint(0, 256, (40,)).tolist()
    cache = KVCache.for_model(model.config, 1, 48)
    list(Generation(model, history[:26], max_new_tokens=1, cache=cache))
    assert cache.length == 26
    fresh = _llmos_steps(model, history, 8)
    cached = _llmos_steps(model, history, 8, cache=cache, cached=26)
    assert cached[0] == fresh[0], kind
    assert (cached[1] - fresh[1]).abs().max().item() < 1e-5, kind


def test_beam_search_crossing_the_original_context_matches(phi3):
    """Three beams over a 28-token prompt pass the original context at the 5th step: transformers'
    beams and scores."""
    from llmos.engine.beam import beam_search

    kind, ref, model = phi3
    torch.manual_seed(8)
    prompt = torch.randint(0, 256, (28,)).tolist()
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), num_beams=3, num_return_sequences=3, max_new_tokens=10,
                           length_penalty=1.0, do_sample=False, eos_token_id=None, pad_token_id=0,
                           return_dict_in_generate=True, output_scores=True)
    beams = beam_search(model, prompt, num_beams=3, max_new_tokens=10, length_penalty=1.0, num_return_sequences=3)
    assert [b.tokens for b in beams] == out.sequences[:, len(prompt):].tolist(), kind
    assert max(abs(b.score - s) for b, s in zip(beams, out.sequences_scores.tolist())) < 1e-4, kind
