"""Continuous batching gives every request exactly what it gets alone."""

from __future__ import annotations

import pytest
import torch
import transformers

from llmos.engine.batch import BatchEngine, Request
from llmos.engine.generate import Generation
from llmos.engine.sampling import SamplingParams
from llmos.weights.load import load_hf, read_hf_config


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request, tmp_path_factory):
    torch.manual_seed(0)
    if request.param == "llama":
        cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    else:
        cfg = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256)
    folder = tmp_path_factory.mktemp(request.param)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    return load_hf(folder, read_hf_config(folder))


def alone(model, prompt, max_new, params=SamplingParams(temperature=0.0), seed=None, stop=frozenset()):
    return list(Generation(model, prompt, max_new_tokens=max_new, params=params, seed=seed, stop_ids=stop).tokens())


def prompts(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]


def test_staggered_requests_match_solo_greedy(model):
    engine = BatchEngine(model, max_batch=4, max_len=128, prefill_chunk=8)
    reqs = [Request(p, max_new_tokens=5 + 3 * i) for i, p in enumerate(prompts(8))]
    pending = list(reqs)
    step = 0
    while pending or not engine.idle:
        if pending and step % 3 == 0:  # join at different steps, more requests than rows
            engine.submit(pending.pop(0))
        engine.step()
        step += 1
    for r in reqs:
        assert r.finish_reason == "length"
        assert r.output == alone(model, r.prompt, r.max_new_tokens)


def test_a_step_prefills_up_to_its_token_budget(model):
    """Short prompts that fit one step's budget all start decoding together; a long one is spread
    over steps of at most `prefill_chunk` tokens while the others keep decoding."""
    short = [Request(p[:5], max_new_tokens=6) for p in prompts(3, seed=7) if len(p) >= 5][:2]
    engine = BatchEngine(model, max_batch=4, max_len=128, prefill_chunk=12)
    for r in short:
        engine.submit(r)
    engine.step()
    assert len(engine.rows) == 2 and all(len(r.output) == 1 for r in short)
    long = Request(list(range(3, 33)), max_new_tokens=4)  # 30 tokens: 12 + 12 + 6
    engine.submit(long)
    for expected in (12, 24, 30):
        engine.step()
        assert long.prefilled == expected
    while not engine.idle:
        engine.step()
    for r in short + [long]:
        assert r.output == alone(model, r.prompt, r.max_new_tokens)


def test_seeded_sampling_matches_solo(model):
    params = SamplingParams(temperature=0.9, top_k=20)
    reqs = [Request(p, max_new_tokens=12, params=params, seed=100 + i) for i, p in enumerate(prompts(5, seed=2))]
    BatchEngine(model, max_batch=3, max_len=128).run(reqs)
    for r in reqs:
        assert r.output == alone(model, r.prompt, 12, params, seed=r.seed)


def test_stop_ids_end_a_request(model):
    p = prompts(1, seed=3)[0]
    solo = alone(model, p, 10)
    stop = frozenset([solo[4]])
    (r,) = BatchEngine(model, max_batch=2, max_len=128).run([Request(p, 10, stop_ids=stop)])
    assert r.finish_reason == "eos" and r.output == alone(model, p, 10, stop=stop)


def test_min_new_tokens_bans_stop_ids_then_lets_them_end(model):
    """Greedy rows take the step's batched argmax, except while min_new_tokens bans their stop ids."""
    p = prompts(1, seed=8)[0]
    free = alone(model, p, 12)
    stop = frozenset([free[2], free[6]])
    reqs = [Request(p, 12, stop_ids=stop, min_new_tokens=m) for m in (0, 4)]
    BatchEngine(model, max_batch=2, max_len=128).run(reqs)
    for r, m in zip(reqs, (0, 4)):
        solo = list(Generation(model, p, max_new_tokens=12, min_new_tokens=m, params=SamplingParams(temperature=0.0),
                               stop_ids=stop).tokens())
        assert r.output == solo
    assert reqs[0].finish_reason == "eos" and len(reqs[0].output) == free.index(min(stop, key=free.index))
    assert len(reqs[1].output) >= 4 and not stop & set(reqs[1].output[:4])


def test_cancel_frees_the_row(model):
    engine = BatchEngine(model, max_batch=2, max_len=128)
    a, b, c = (Request(p, 30) for p in prompts(3, seed=4))
    for r in (a, b, c):
        engine.submit(r)
    for _ in range(6):
        engine.step()
    assert len(engine.rows) == 2 and c in engine.waiting
    engine.cancel(a)
    assert a.finish_reason == "cancelled" and len(engine.rows) == 1
    while not engine.idle:
        engine.step()
    assert b.output == alone(model, b.prompt, 30) and c.output == alone(model, c.prompt, 30)


def test_prefix_sharing_gives_identical_outputs(model):
    base = prompts(1, seed=5)[0] + list(range(10, 40))
    reqs = [Request(base + [50 + i, 60 + i], 8) for i in range(4)]
    shared = BatchEngine(model, max_batch=4, max_len=128, share_prefixes=True)
    shared.run(reqs)
    assert shared.prefix_tokens_reused > 0
    plain = [Request(r.prompt, 8) for r in reqs]
    BatchEngine(model, max_batch=4, max_len=128, share_prefixes=False).run(plain)
    assert [r.output for r in reqs] == [r.output for r in plain]
    assert all(r.output == alone(model, r.prompt, 8) for r in reqs)


def test_batched_default_model_matches_solo_greedy(fast_llm):
    """On the real model in its fast form, rows of different lengths decoded together give exactly
    the tokens each gives alone."""
    texts = ["The capital of France is", "Write a haiku about autumn leaves falling slowly:", "1, 2, 3,",
             "def add(a, b):\n    return"]
    reqs = [Request(fast_llm.encode(t), 40, min_new_tokens=40) for t in texts]
    engine = BatchEngine(fast_llm.model, max_batch=4, max_len=256)
    engine.run(reqs)
    for r in reqs:
        solo = list(Generation(fast_llm.model, r.prompt, max_new_tokens=40, min_new_tokens=40,
                               params=SamplingParams(temperature=0.0)).tokens())
        assert r.output == solo
