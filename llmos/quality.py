"""Quality and speed of the fast weight forms, measured, not assumed (loading is weights/loader.py's).

`report(path)` loads a model in each form, runs a fixed English text (llmos/data/quality.txt)
through it and gives perplexity and top-1 agreement with fp32 (the dequantized weights). `auto_form`
picks the fastest form whose perplexity is within 2% of fp32's; the verdict is cached in the model
store under quality/, keyed by the model file's identity, so the check runs once per model.

A quantized GGUF file whose layers are not all Q4_1 (Q4_K_M, Q5_K_M, Q6_K, Q8_0, Q4_0... files) runs
its own blocks ("gguf") under `auto`, without a measurement: they are the file's weights exactly (no
second rounding), and on Gemma 3 270M Q4_K_M they ran faster than the converted int4 form (decode
1.2x, prefill 1.07x, one process, alternating rounds; README "Weight forms and speed"). A Q4_1 file
keeps int4: its blocks are int4's own bits, and int4 runs the whole C++ decode step, which declines
gguf layers (the Python step it would fall back to decodes the default model at about half the
speed). Only with kernels that multiply blocks natively: the Python path dequantizes every call.
`speed(path, form)` times load, a 512-token prefill and greedy decode (`llmos bench`, bench/).
"""

from __future__ import annotations

import json
import math
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from llmos import derived, quant, store
from llmos.files import write_atomically
from llmos.gguf_linear import QTYPES
from llmos.models.kernels import PYTORCH, Kernels
from llmos.weights.gguf import GGUFFile
from llmos.weights.loader import kv_dtype, load_model, save_converted

# Fastest first, for batch-1 decode on a CPU (see bench/): auto takes the first that passes.
SPEED_ORDER = ("int4", "int8", "bf16", "fp32")
MAX_PPL_INCREASE = 0.02


def quality_text() -> str:
    return resources.files("llmos.data").joinpath("quality.txt").read_text(encoding="utf-8")


@torch.inference_mode()
def _logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids]), torch.arange(len(ids)))[0].float()  # (T, V)


def perplexity(logits: torch.Tensor, ids: list[int]) -> float:
    return math.exp(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item())


def report(path: Path, forms: tuple[str, ...] = SPEED_ORDER, stop_at_first_pass: bool = False,
           quiet: bool = True, kernels: Kernels = PYTORCH) -> dict[str, Any]:
    """{form: {"perplexity", "ppl_increase", "top1_agreement", "passes"}} with fp32 as the reference,
    each form running `kernels` (those it will run with); unless `quiet`, a progress bar on stderr
    over the forms measured."""
    bar = tqdm(total=len(forms), desc=f"measuring weight forms of {path.name}", unit="form", disable=quiet,
               file=sys.stderr, bar_format="{desc}: {n}/{total} {postfix} [{elapsed}]")
    bar.set_postfix_str("fp32")
    model, config, tokenizer = load_model(path, "fp32", kernels=kernels)
    ids = tokenizer.encode(quality_text())[: config.max_seq_len]
    ref = _logits(model, ids)
    del model
    base = perplexity(ref, ids)
    out: dict[str, Any] = {"fp32": {"perplexity": base, "ppl_increase": 0.0, "top1_agreement": 1.0, "passes": True}}
    for form in forms:
        if form == "fp32":
            continue
        bar.update()
        bar.set_postfix_str(form)
        model, _, _ = load_model(path, form, kernels=kernels, use_cache=False)
        logits = _logits(model, ids)
        ppl = perplexity(logits, ids)
        out[form] = {
            "perplexity": ppl,
            "ppl_increase": ppl / base - 1,
            "top1_agreement": (logits.argmax(-1) == ref.argmax(-1)).float().mean().item(),
            "passes": ppl / base - 1 <= MAX_PPL_INCREASE,
        }
        if stop_at_first_pass and out[form]["passes"]:
            save_converted(model, derived.converted_file(path, form))  # what `auto` loads next: converted once
            break
    bar.update(bar.total - bar.n)
    bar.close()
    out["tokens"] = len(ids)
    return out


Q4_1 = 3  # GGML type id: blocks that are int4's own bits (quant.Int4Linear.from_q4_1)


def runs_own_form(path: Path) -> bool:
    """Whether `path` is a quantized GGUF file whose layers hold block types other than Q4_1 (the
    token table aside: the default Q4_1 file keeps it in Q8_0), all of which the kernels run."""
    if store.kind_of(path) != "gguf":
        return False
    with GGUFFile(path) as gguf:
        types = {t.qtype for name, t in gguf.tensors.items() if name.startswith("blk.") and len(t.shape) == 2}
    quantized = types - {0, 1, 30}  # F32, F16, BF16
    return bool(quantized) and quantized <= QTYPES and quantized != {Q4_1}


def forms_of(path: Path) -> tuple[str, ...]:
    """The forms a model loads in, fastest-first order aside: fp32, bf16, int8, int4, and "gguf" for a
    GGUF file with quantized blocks the kernels run (`llmos bench` compares them all)."""
    if store.kind_of(path) != "gguf":
        return quant.FORMS
    with GGUFFile(path) as gguf:
        own = any(t.qtype in QTYPES for t in gguf.tensors.values())
    return quant.FORMS + (("gguf",) if own else ())


def native_blocks(kernels: Kernels) -> bool:
    """Whether `kernels` multiply GGUF blocks themselves (one Q8_0 block of zeros, tried)."""
    return kernels.gguf_mm(torch.zeros(1, 32), torch.zeros(34, dtype=torch.uint8), 8, 1) is not None


def auto_form(path: Path, quiet: bool = True, kernels: Kernels = PYTORCH) -> str:
    """The file's own form for a GGUF file `runs_own_form` accepts (when the kernels run its blocks),
    else the fastest form whose perplexity passes the 2% rule (measured once, then cached in the
    store, keyed by the model's content: every path to the same file shares it). Unless `quiet`, the
    first measurement says on stderr what it is doing: it takes ~15 s."""
    if runs_own_form(path) and native_blocks(kernels):
        return "gguf"
    cache = derived.verdict_file(path)
    try:
        return json.loads(cache.read_text())["auto"]
    except (OSError, ValueError, KeyError):
        pass
    if not quiet:
        print(f"llmos: first load of {path}: choosing the fastest weight form within {MAX_PPL_INCREASE:.0%} of "
              "fp32 perplexity and converting to it (once per model; later loads take well under a second)",
              file=sys.stderr, flush=True)
    result = report(path, stop_at_first_pass=True, quiet=quiet, kernels=kernels)
    chosen = next(f for f in SPEED_ORDER if f in result and result[f]["passes"])
    result["auto"] = chosen
    cache.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(cache, json.dumps(result, indent=2))
    return chosen


# --- speed ----------------------------------------------------------------------------------------

PROMPT_TOKENS = 512


def prompt_ids(vocab: int) -> list[int]:
    """Deterministic ordinary-text-like ids away from the special tokens at the start of the vocab."""
    return [1000 + (i * 7919) % (vocab - 2000) for i in range(PROMPT_TOKENS)]


def timed(model: torch.nn.Module, vocab: int, tokens: int, kv_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Prefill tok/s of a 512-token prompt (timed the second time: the first pays page faults and
    new-shape kernels once) and greedy decode tok/s over `tokens` tokens after the first, with a KV
    cache of `kv_dtype` (None: the weights')."""
    from llmos.engine.generate import Generation
    from llmos.engine.sampling import SamplingParams

    prompt, greedy = prompt_ids(vocab), SamplingParams(temperature=0.0)
    for _ in range(2):
        t0 = time.perf_counter()
        list(Generation(model, prompt, max_new_tokens=1, params=greedy, kv_dtype=kv_dtype).tokens())
        prefill = PROMPT_TOKENS / (time.perf_counter() - t0)
    it = Generation(model, prompt[:16], max_new_tokens=tokens + 1, params=greedy, min_new_tokens=tokens + 1,
                    kv_dtype=kv_dtype).tokens()
    next(it)
    t0 = time.perf_counter()
    n = sum(1 for _ in it)
    return {"prefill_tps": prefill, "decode_tps": n / (time.perf_counter() - t0)}


def speed(path: Path, form: str, tokens: int, kernels: Kernels = PYTORCH) -> dict[str, float]:
    t0 = time.perf_counter()
    model, config, _ = load_model(path, form, kernels=kernels)
    load_s = time.perf_counter() - t0
    return {"load_s": load_s, **timed(model, config.vocab_size, tokens, kv_dtype(form))}
