"""Beam search: the n best continuations of one prompt, with their scores.

Contract: `beam_search(model, prompt, num_beams=..., max_new_tokens=...)` returns up to
`num_return_sequences` `Beam`s, best first. It reproduces transformers' `generate(num_beams=...)` for
a decoder-only model: same tokens, and `Beam.score` equals its `sequences_scores`, the sum of the
hypothesis' token log-probabilities (after the logits processors) divided by
`generated_length ** length_penalty`, where the generated length counts the stop id a hypothesis
ended on. The rules that decide which hypotheses survive, ported from transformers'
`GenerationMixin._beam_search`:

- each step ranks all `num_beams * V` continuations and keeps the best
  `max(2, 1 + len(stop_ids)) * num_beams`, so at least `num_beams` of them can go on running even
  when many end on a stop id;
- a continuation that ends (on a stop id, or at `max_new_tokens`) becomes a finished hypothesis only
  if it ranks within the first `num_beams` of those; the `num_beams` best finished ones are kept;
- `early_stopping=True` stops once `num_beams` hypotheses are finished; `False` stops once the best
  running beam, scored at its current length, cannot beat the worst finished one; `"never"` does the
  same with the best length the beam could still reach (`max_new_tokens` when `length_penalty > 0`).

The beams run as one batch of `num_beams` rows through one KVCache: the prompt is prefilled once
(batch 1) and copied into every row, and after each step the cache rows are reordered to follow the
beams that survived. The only controls that apply are the deterministic logits processors of
`SamplingParams` (`logit_bias`, `repetition_penalty`, `no_repeat_ngram_size`, and OpenAI's
`presence_penalty`/`frequency_penalty` over the generated tokens, which transformers lacks) and
`min_new_tokens`; as in transformers they act on log-probabilities, not raw logits. The sampling
controls (`temperature`, `top_k`, `top_p`, `min_p`) are ignored, as transformers ignores them with
`do_sample=False`. `num_beams=1` is a one-beam search (which may keep running past a stop id under
`early_stopping=False`), not greedy decoding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from llmos.engine.generate import decode_one, prefill, restarts
from llmos.engine.sampling import SamplingParams, check_range, is_int, process
from llmos.errors import LlmosError
from llmos.models.kv_cache import KVCache, cache_dtype

NEG = -1.0e9  # transformers' "impossible" score: large but finite, so sums stay comparable


@dataclass(frozen=True)
class Beam:
    tokens: list[int]  # generated tokens only; a final stop id is not included
    score: float  # transformers' sequences_scores: sum of log-probs / generated_length ** length_penalty
    finish_reason: str = "length"  # "eos" (ended on a stop id) or "length" (reached max_new_tokens)
    stop_id: int | None = None  # the stop id it ended on ("eos")


def _check(
    model: nn.Module, prompt: Sequence[int], num_beams: int, max_new_tokens: int, length_penalty: float,
    early_stopping: bool | str, num_return_sequences: int, min_new_tokens: int,
) -> None:
    if not prompt:
        raise LlmosError("the prompt is empty: give at least one token")
    if not is_int(num_beams) or num_beams < 1:
        raise LlmosError(f"num_beams must be an integer >= 1, got {num_beams!r}")
    if not is_int(max_new_tokens) or max_new_tokens < 1:
        raise LlmosError(f"max_new_tokens must be an integer >= 1 for beam search, got {max_new_tokens!r}")
    if not is_int(num_return_sequences) or not 1 <= num_return_sequences <= num_beams:
        raise LlmosError(f"num_return_sequences must be an integer in [1, num_beams={num_beams}], got {num_return_sequences!r}")
    if not is_int(min_new_tokens) or not 0 <= min_new_tokens <= max_new_tokens:
        raise LlmosError(f"min_new_tokens must be an integer in [0, max_new_tokens={max_new_tokens}], got {min_new_tokens!r}")
    check_range("length_penalty", length_penalty, None, None, "a finite number")
    if early_stopping not in (True, False, "never") or not isinstance(early_stopping, (bool, str)):
        raise LlmosError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    total, context = len(prompt) + max_new_tokens, model.config.max_seq_len
    if total > context:
        raise LlmosError(
            f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) = {total} exceeds the "
            f"model's context of {context} tokens; shorten the prompt or ask for fewer tokens"
        )


@torch.inference_mode()
def beam_search(
    model: nn.Module,
    prompt: Sequence[int],
    *,
    num_beams: int,
    max_new_tokens: int,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    stop_ids: frozenset[int] = frozenset(),
    num_return_sequences: int = 1,
    params: SamplingParams | None = None,
    min_new_tokens: int = 0,
    kv_dtype: torch.dtype | None = None,
) -> list[Beam]:
    """The `num_return_sequences` best hypotheses for `prompt`, best first (see the module header).
    `kv_dtype`: the KV cache's dtype (None: the weights')."""
    params = params or SamplingParams(temperature=0.0)
    _check(model, prompt, num_beams, max_new_tokens, length_penalty, early_stopping, num_return_sequences, min_new_tokens)
    processors = replace(params, temperature=0.0)  # greedy params: process() stops before the warpers
    needs_output = params.needs_output
    K, T = num_beams, len(prompt)
    total = T + max_new_tokens
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long)
    n_keep = max(2, 1 + len(stop_ids)) * K  # candidates kept per step
    in_top_k = torch.arange(n_keep) < K  # only these may become finished hypotheses

    # Prefill once, into beam 0's row, then copy the prompt's keys/values into the other rows.
    cache = KVCache.for_model(model.config, K, total, cache_dtype(model, kv_dtype))
    logits = prefill(model, torch.tensor([list(prompt)]), 0, cache.rows(0, 1))  # (1, V)
    cache.k[:, 1:, :, :T] = cache.k[:, :1, :, :T]  # (L, K-1, H, T, D) <- (L, 1, H, T, D)
    cache.v[:, 1:, :, :T] = cache.v[:, :1, :, :T]
    cache.length = T
    logits = logits.expand(K, -1)  # (K, V)
    V = logits.shape[-1]

    # Running beams: sequences (K, total) and accumulated log-probs (K,). Only beam 0 is live at first,
    # so the first step does not pick the same token K times.
    seqs = torch.zeros(K, total, dtype=torch.long)
    seqs[:, :T] = torch.tensor(list(prompt))
    run_scores = torch.zeros(1, K)
    run_scores[:, 1:] = NEG
    # Finished hypotheses: K slots, best first, with their generated lengths.
    done_seqs, done_lens = seqs.clone(), torch.zeros(1, K, dtype=torch.long)
    done_scores = torch.full((1, K), NEG)
    done_flags = torch.zeros(1, K, dtype=torch.bool)
    improvable = torch.ones(1, 1, dtype=torch.bool)

    for cur in range(T, total):
        step = cur - T
        if step and restarts(model, cur - 1, cur):  # LongRoPE past its original context: every beam anew
            logits = prefill(model, seqs[:, :cur], 0, cache)  # (K, V)
        elif step:
            logits = decode_one(model, seqs[:, cur - 1], cur - 1, cache)  # (K, V)
        output = seqs[:, T:cur] if needs_output else None
        suppress = stop if step < min_new_tokens else None
        logprobs = process(logits.log_softmax(dim=-1), processors, seqs[:, :cur], output, suppress)
        cand = (logprobs + run_scores[0, :, None]).reshape(1, K * V)

        # The n_keep best continuations over all beams, and which of them end here.
        top_scores, top_idx = torch.topk(cand, n_keep)  # (1, n_keep)
        src, tok = top_idx[0] // V, top_idx[0] % V
        cand_seqs = seqs[src]  # (n_keep, total)
        cand_seqs[:, cur] = tok
        ends = torch.isin(tok, stop) | (cur + 1 >= total)  # (n_keep,)
        ends = ends[None]  # (1, n_keep)

        # The K best that go on running (ended ones are pushed to the bottom).
        live_scores = top_scores + ends.to(torch.float32) * NEG
        keep = torch.topk(live_scores, K)[1][0]  # (K,)
        seqs, run_scores, beam_src = cand_seqs[keep], live_scores[:, keep], src[keep]

        # Merge the newly ended continuations into the finished hypotheses when they rank high enough.
        finished_now = ends & in_top_k[None]
        fin_scores = top_scores / ((cur + 1 - T) ** length_penalty)
        fin_scores += (torch.all(done_flags, dim=-1, keepdim=True) & (early_stopping is True)).to(torch.float32) * NEG
        fin_scores += (~improvable).to(torch.float32) * NEG
        fin_scores += (~finished_now) * NEG
        merged = torch.cat((done_scores, fin_scores), dim=1)
        best = torch.topk(merged, K)[1][0]  # (K,)
        done_scores = merged[:, best]
        done_seqs = torch.cat((done_seqs, cand_seqs))[best]
        done_lens = torch.cat((done_lens, torch.full((1, n_keep), step + 1)), dim=1)[:, best]
        done_flags = torch.cat((done_flags, finished_now), dim=1)[:, best]

        # The cache rows follow the surviving beams.
        if not torch.equal(beam_src, torch.arange(K)):
            n = cache.length
            cache.k[:, :, :, :n] = cache.k[:, :, :, :n].index_select(1, beam_src)  # (L, K, H, S, D)
            cache.v[:, :, :, :n] = cache.v[:, :, :, :n].index_select(1, beam_src)

        # Can a running beam still beat the worst finished hypothesis?
        reachable = max_new_tokens if early_stopping == "never" and length_penalty > 0.0 else step + 1
        best_possible = run_scores[:, :1] / (reachable ** length_penalty)
        worst_done = torch.where(done_flags, torch.min(done_scores, dim=1, keepdim=True)[0], NEG)
        improvable = improvable & torch.any(best_possible > worst_done, dim=-1, keepdim=True)
        all_done = bool(torch.all(done_flags)) and early_stopping is True
        if not bool(improvable.any()) or all_done or bool(ends.all()):
            break

    beams = []
    for row in range(num_return_sequences):
        if not done_flags[0, row]:  # only when fewer hypotheses finished than asked for (degenerate)
            break
        gen = done_seqs[row, T:T + int(done_lens[0, row])].tolist()
        reason = "eos" if gen and gen[-1] in stop_ids else "length"
        if reason == "eos":
            beams.append(Beam(gen[:-1], float(done_scores[0, row]), reason, gen[-1]))
        else:
            beams.append(Beam(gen, float(done_scores[0, row]), reason))
    return beams
