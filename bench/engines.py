"""One engine measured in its own process: `python -m bench.engines ENGINE GGUF` prints one JSON line.

Each engine loads the same GGUF file, prefills the same 512-token prompt and decodes greedily at
batch 1 with the same thread count; load to first token is from the start of loading until the
logits of a 16-token prompt's last position (the first token's) are computed; peak RSS is the process's own high-water mark. Prefill is timed
on the second run of the prompt in every engine: the first pays one-time costs (page faults on the
weights, kernels generated for new shapes) that a server or chat pays once, not per prompt.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

from llmos.quality import PROMPT_TOKENS, prompt_ids

DECODE_TOKENS = 128


def peak_rss_mb() -> float:
    """This process's peak resident set size. Read from /proc (VmHWM) rather than getrusage: Linux
    carries ru_maxrss across exec, so a benchmark subprocess would report at least its parent's size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_llmos(path: Path, threads: int, dtype: str) -> dict:
    import torch

    torch.set_num_threads(threads)
    import llmos
    from llmos.engine.generate import Generation
    from llmos.engine.sampling import SamplingParams
    from llmos.quality import timed

    t0 = time.perf_counter()
    llm = llmos.load(str(path), dtype=dtype, threads=threads)  # else load picks its own count (auto_threads)
    load_s = time.perf_counter() - t0
    greedy = SamplingParams(temperature=0.0)
    next(Generation(llm.model, prompt_ids(llm.config.vocab_size)[:16], max_new_tokens=1, params=greedy,
                    kv_dtype=llm.kv_dtype).tokens())
    first_token_s = time.perf_counter() - t0
    return {"load_s": load_s, "first_token_s": first_token_s,
            **timed(llm.model, llm.config.vocab_size, DECODE_TOKENS - 1, llm.kv_dtype), "form": llm.dtype}


def run_transformers(path: Path, threads: int, dtype: str) -> dict:
    import torch

    torch.set_num_threads(threads)
    import transformers

    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32 if dtype == "fp32" else torch.bfloat16).eval()
    load_s = time.perf_counter() - t0
    ids = torch.tensor([prompt_ids(model.config.vocab_size)])
    with torch.no_grad():
        for _ in range(2):  # the second run is timed
            t0 = time.perf_counter()
            model(ids)
            prefill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.generate(ids[:, :16], max_new_tokens=DECODE_TOKENS, min_new_tokens=DECODE_TOKENS, do_sample=False, pad_token_id=0)
        decode_s = time.perf_counter() - t0
    return {"load_s": load_s, "prefill_tps": PROMPT_TOKENS / prefill_s, "decode_tps": DECODE_TOKENS / decode_s}


def run_llamacpp(path: Path, threads: int, dtype: str) -> dict:
    from llama_cpp import Llama

    t0 = time.perf_counter()
    # n_threads_batch too: left out, llama-cpp-python prefills on every core whatever n_threads says.
    llm = Llama(str(path), n_ctx=1024, n_threads=threads, n_threads_batch=threads, n_batch=512, verbose=False)
    load_s = time.perf_counter() - t0
    ids = prompt_ids(llm.n_vocab())
    llm.eval(ids[:16])  # the logits of the 16-token prompt's last position: the first token
    first_token_s = time.perf_counter() - t0
    for _ in range(2):  # the second run is timed
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        prefill_s = time.perf_counter() - t0
    llm.reset()
    llm.eval(ids[:16])
    t0 = time.perf_counter()
    n = 0
    for tok in llm.generate(ids[:16], top_k=1, reset=False):
        n += 1
        if n == DECODE_TOKENS:
            break
    decode_s = time.perf_counter() - t0
    return {"load_s": load_s, "first_token_s": first_token_s, "prefill_tps": PROMPT_TOKENS / prefill_s,
            "decode_tps": n / decode_s}


ENGINES = {"llmos": run_llmos, "transformers": run_transformers, "llama.cpp": run_llamacpp}

if __name__ == "__main__":
    engine, gguf, threads, dtype = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    result = ENGINES[engine](gguf, threads, dtype)
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))
