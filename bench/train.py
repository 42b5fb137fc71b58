"""Training benchmark: llmos's training loop beside a plain transformers loop; LoRA vs full memory.

    python -m bench.train            # a few minutes on 2 cores; writes bench/results/train-DATE.json

Measures, each in its own process (so peak RSS is its own), with the same thread count:
- training throughput, tokens/s, for the `tiny` and `small` presets in Llama shape, batch 8 x 256
  tokens, AdamW, gradient clipping: llmos's `train()` (the loop `llmos pretrain` runs) beside
  `transformers.LlamaForCausalLM` built from the exported config.json of the same model, trained by a
  plain loop with the same optimizer, batch and sequence length; fp32, and bf16 autocast;
- peak memory (RSS) and step time of fine-tuning the default model (SmolLM2-135M, dequantized to
  fp32), batch 4 x 128 tokens: LoRA (rank 8, every projection) against full fine-tuning.
Rounds alternate between engines; the table shows the best round of each (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from bench.engines import peak_rss_mb

RESULTS = Path(__file__).parent / "results"
VOCAB, BATCH, SEQ = 4096, 8, 256
WARMUP, STEPS = 3, 12


def _tokens():
    import numpy as np

    rng = np.random.default_rng(0)
    return rng.integers(3, VOCAB, size=(WARMUP + STEPS) * BATCH * SEQ + 1, dtype=np.int64)


def worker_llmos(size: str, dtype: str) -> dict:
    import torch

    from llmos.train.data import Windows
    from llmos.train.distributed import World
    from llmos.train.loop import TrainConfig, train
    from llmos.train.presets import init_weights, model_config
    from llmos.weights.load import build_model

    config = model_config(size, "llama", VOCAB)
    torch.manual_seed(0)
    model = build_model(config, "cpu")
    init_weights(model, config.n_layers)
    model.tie_weights()
    windows = Windows(_tokens(), None, SEQ)
    cfg = TrainConfig(steps=WARMUP + STEPS, batch_size=BATCH, seq_len=SEQ, dtype=dtype, warmup=1,
                      log_every=WARMUP, eval_every=10**6, save_every=10**6)
    with tempfile.TemporaryDirectory() as run:
        train(model, windows, None, cfg, Path(run), World(0, 1, 0, torch.device("cpu")), progress=False)
        rows = [json.loads(x) for x in (Path(run) / "log.jsonl").read_text().splitlines()]
    # The first row covers the warm-up steps; the last, the measured ones.
    return {"tok_per_s": rows[-1]["tok_per_s"], "peak_rss_mb": peak_rss_mb(),
            "params": sum(p.numel() for p in model.parameters())}


def worker_transformers(size: str, dtype: str) -> dict:
    import contextlib

    import torch
    import torch.nn.functional as F
    import transformers

    from llmos.train.presets import model_config
    from llmos.weights.export import hf_config

    config = model_config(size, "llama", VOCAB)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config(config)))
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.95))
    tokens = torch.from_numpy(_tokens())
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if dtype == "bf16" else contextlib.nullcontext
    t0 = 0.0
    for step in range(WARMUP + STEPS):
        if step == WARMUP:
            t0 = time.perf_counter()
        chunk = tokens[step * BATCH * SEQ : (step + 1) * BATCH * SEQ + 1]
        x = chunk[:-1].view(BATCH, SEQ)  # (B, T)
        y = chunk[1:].view(BATCH, SEQ)  # (B, T)
        with ctx():
            logits = model(input_ids=x).logits  # (B, T, V)
            loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - t0
    return {"tok_per_s": STEPS * BATCH * SEQ / elapsed, "peak_rss_mb": peak_rss_mb(),
            "params": sum(p.numel() for p in model.parameters())}


def worker_finetune(mode: str) -> dict:
    import torch

    from llmos import store
    from llmos.models.lora import LoraConfig, apply_lora
    from llmos.train.loop import TrainConfig, make_optimizer, token_losses
    from llmos.train.run import load_for_training

    model, config = load_for_training(str(store.resolve(store.DEFAULT_CHAT_MODEL)))
    if mode == "lora":
        apply_lora(model, LoraConfig(rank=8, alpha=16))
    model.train()
    opt, _ = make_optimizer(model, TrainConfig(lr=1e-4))
    torch.manual_seed(0)
    B, T = 4, 128
    times = []
    for _ in range(4):
        x = torch.randint(3, config.vocab_size, (B, T + 1))
        t0 = time.perf_counter()
        loss = token_losses(model, x[:, :-1], x[:, 1:], torch.ones(B, T)) / (B * T)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"peak_rss_mb": peak_rss_mb(), "step_s": min(times[1:]), "trainable": trainable}


def _measure(*args: str, threads: int) -> dict:
    import os

    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, "-m", "bench.train", "--worker", *args], capture_output=True, text=True,
                         env=env, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"bench worker {args} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(rounds: int = 2, threads: int = 2) -> dict:
    """Measure everything; returns the results dict (also written to bench/results/)."""
    throughput: dict[str, dict[str, dict]] = {}
    for size, dtype in (("tiny", "fp32"), ("small", "fp32"), ("small", "bf16")):
        key = f"{size} {dtype}"
        best: dict[str, dict] = {}
        for r in range(rounds):
            for engine in ("llmos", "transformers"):  # alternate, so drift in machine load hits both
                got = _measure(engine, size, dtype, threads=threads)
                print(f"round {r + 1}: {key} {engine}: {got['tok_per_s']:,.0f} tok/s", file=sys.stderr)
                if engine not in best or got["tok_per_s"] > best[engine]["tok_per_s"]:
                    best[engine] = got
        throughput[key] = best
    memory = {mode: _measure("finetune", mode, threads=threads) for mode in ("full", "lora")}
    return {"date": str(date.today()), "machine": platform.machine(), "threads": threads,
            "batch": BATCH, "seq_len": SEQ, "vocab": VOCAB, "throughput": throughput, "finetune_default_model": memory}


def table(res: dict) -> str:
    lines = [f"{'training tokens/s (best of rounds)':<36}{'llmos':>12}{'transformers':>14}{'llmos/hf':>10}"]
    lines.append("-" * len(lines[0]))
    for key, best in res["throughput"].items():
        a, b = best["llmos"]["tok_per_s"], best["transformers"]["tok_per_s"]
        label = f"{key} (B={res['batch']}, T={res['seq_len']})"
        lines.append(f"{label:<36}{a:>12,.0f}{b:>14,.0f}{a / b:>9.2f}x")
    m = res["finetune_default_model"]
    lines += ["", f"{'fine-tune smollm2-135m, B=4 T=128':<36}{'full':>12}{'LoRA r=8':>14}{'LoRA/full':>10}"]
    lines.append("-" * len(lines[-1]))
    for metric, unit in (("peak_rss_mb", "peak RSS (MB)"), ("step_s", "step time (s)"), ("trainable", "trainable params")):
        f, lo = m["full"][metric], m["lora"][metric]
        lines.append(f"{unit:<36}{f:>12,.2f}{lo:>14,.2f}{lo / f:>9.3f}x" if metric != "trainable" else
                     f"{unit:<36}{f:>12,}{lo:>14,}{lo / f:>9.4f}x")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, *rest = args.worker
        fn = {"llmos": worker_llmos, "transformers": worker_transformers, "finetune": worker_finetune}[kind]
        print(json.dumps(fn(*rest)))
        return
    res = run(args.rounds, args.threads)
    print(f"\nllmos training bench {res['date']} on {res['machine']}, {res['threads']} threads")
    print(table(res))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"train-{res['date']}.json"
    out.write_text(json.dumps(res, indent=2))
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
