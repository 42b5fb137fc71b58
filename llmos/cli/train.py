"""`llmos tokenizer train`, `pretrain`, `finetune`, `eval perplexity`, `export`: training from the shell.

Each command is a thin layer over llmos.train (run.py, bpe.py, evaluate.py) and
llmos.weights.export. `pretrain` and `finetune` also run under torchrun
(`torchrun --nproc-per-node 2 -m llmos pretrain ...`): every process runs the same command.
`pretrain` and `finetune` print an estimate after the first steps; Ctrl-C saves a checkpoint, prints
the `--resume` command that continues the run, and exits 130.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from llmos.cli.eval import get_eval_subparsers
from llmos.errors import LlmosError


def add_parsers(sub: argparse._SubParsersAction) -> None:
    tok_parser = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    tok_parser.set_defaults(func=lambda _: _usage(tok_parser))
    tok = tok_parser.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    p = tok.add_parser("train", help="learn a tokenizer.json from text files, folders or JSONL")
    p.add_argument("data", nargs="+", help="text files, folders, .jsonl")
    p.add_argument("--vocab", type=int, default=8000, help="vocabulary size, specials included")
    p.add_argument("-o", "--out", required=True, help="tokenizer.json to write")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_tokenizer_train)

    p = sub.add_parser("pretrain", help="train a model from scratch (or --resume a run)")
    p.add_argument("data", nargs="*", help="text files, folders, .jsonl")
    p.add_argument("--out", "-o", help="run folder to create")
    p.add_argument("--resume", metavar="RUN", help="continue RUN (any pretrain or finetune run) from its newest checkpoint")
    p.add_argument("--restart", action="store_true", help="discard a run already in --out and start over")
    p.add_argument("--size", default="tiny", help="tiny, small, medium, large")
    p.add_argument("--arch", default="llama", choices=["llama", "gpt2"])
    p.add_argument("--tokenizer", help="tokenizer.json or folder; default: train one on the data")
    p.add_argument("--vocab", type=int, default=4096, help="vocabulary of the tokenizer trained when none is given")
    for flag, dest in (("--dim", "dim"), ("--layers", "n_layers"), ("--heads", "n_heads"),
                       ("--kv-heads", "n_kv_heads"), ("--ffn", "ffn_dim"), ("--context", "max_seq_len")):
        p.add_argument(flag, dest=dest, type=int, help="override the preset")
    _train_args(p, lr=1e-3, steps=1000, warmup=50)
    p.set_defaults(func=run_pretrain)

    p = sub.add_parser("finetune", help="fine-tune a model on your data, fully or with LoRA")
    p.add_argument("base", nargs="?", help="store name, .gguf file or Hugging Face folder")
    p.add_argument("--data", nargs="+", help="text files, folders, .jsonl (text or chat messages)")
    p.add_argument("--out", "-o", help="run folder to create")
    p.add_argument("--resume", metavar="RUN", help="continue RUN from its newest checkpoint")
    p.add_argument("--restart", action="store_true", help="discard a run already in --out and start over")
    p.add_argument("--lora", action="store_true", help="train a low-rank adapter instead of every weight")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--targets", default="", help="comma-separated module patterns (default: every projection)")
    p.add_argument("--merge", action="store_true", help="fold the adapter into the weights at the end")
    _train_args(p, lr=None, steps=200, warmup=10)
    p.set_defaults(func=run_finetune)

    p = get_eval_subparsers(sub).add_parser("perplexity", help="perplexity on held-out text; for a fine-tuning run also its base (before/after)")
    p.add_argument("model", help="run folder, store name, .gguf or Hugging Face folder")
    p.add_argument("--data", nargs="+", required=True, help="held-out text files, folders, .jsonl")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(func=run_eval)

    p = sub.add_parser("export", help="write a run or model as a Hugging Face folder or a GGUF file")
    p.add_argument("model", help="run folder, store name, .gguf or Hugging Face folder")
    p.add_argument("--format", "-f", choices=["hf", "gguf"], default="hf")
    p.add_argument("--type", dest="qtype", choices=["f16", "q8_0"], default="f16", help="GGUF tensor type")
    p.add_argument("-o", "--out", required=True, help="folder (hf), .gguf file or folder (gguf)")
    p.set_defaults(func=run_export)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _train_args(p: argparse.ArgumentParser, *, lr: float | None, steps: int, warmup: int) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=None, help=f"optimizer steps (default {steps}; with --resume: the run's)")
    g.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch, per process")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 256, or the model's context if shorter)")
    g.add_argument("--lr", type=float, default=lr, help="peak learning rate" + (f" (default {lr})" if lr else " (default 2e-4 LoRA, 3e-5 full)"))
    g.add_argument("--warmup", type=int, default=warmup)
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping; 0 turns it off")
    g.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast matmuls")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--eval-every", type=int, default=100)
    g.add_argument("--save-every", type=int, default=100)
    g.add_argument("--val-fraction", type=float, default=0.1)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda")
    g.add_argument("--quiet", action="store_true", help="no progress bars or time estimate")
    p.set_defaults(default_steps=steps)


def _train_config(args: argparse.Namespace, lr: float, context: int | None = None):
    from llmos.train.loop import TrainConfig

    seq_len = args.seq_len or min(256, context or 256)
    return TrainConfig(
        steps=args.steps or args.default_steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
        seq_len=seq_len, lr=lr, warmup=args.warmup, weight_decay=args.weight_decay, grad_clip=args.clip,
        dtype=args.dtype, seed=args.seed, eval_every=args.eval_every, save_every=args.save_every,
        val_fraction=args.val_fraction,
    )


def _say(message: str) -> None:
    """Print once per job: under torchrun only rank 0 speaks."""
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr)


def _finished(run: Path) -> int:
    _say(f"run {run} finished: llmos generate --model {run} \"...\"")
    return 0


def _until_done_or_stopped(args: argparse.Namespace, train: Callable[[], Path]) -> int:
    """Run `train`; on Ctrl-C (a checkpoint is saved) print the command that continues, exit 130."""
    from llmos.train.loop import Interrupted

    try:
        return _finished(train())
    except Interrupted as stop:
        launcher = "llmos"
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            launcher = f"torchrun --nproc-per-node {os.environ.get('LOCAL_WORLD_SIZE', '?')} -m llmos"
        device = f" --device {shlex.quote(args.device)}" if args.device != "auto" else ""
        _say(f"stopped at step {stop.step}, saved in {stop.checkpoint}; to continue:\n"
             f"  {launcher} {args.command} --resume {shlex.quote(str(stop.run))}{device}")
        return 130


def run_tokenizer_train(args: argparse.Namespace) -> int:
    from llmos.train.bpe import train_tokenizer

    tok = train_tokenizer(args.data, args.vocab, args.out, progress=not args.quiet)
    print(f"wrote {args.out} ({tok.vocab_size} tokens)", file=sys.stderr)
    return 0


def _resume(args: argparse.Namespace) -> int:
    from llmos.train.run import resume

    return _until_done_or_stopped(
        args, lambda: resume(args.resume, steps=args.steps, device=args.device, progress=not args.quiet))


def run_pretrain(args: argparse.Namespace) -> int:
    if args.resume:
        return _resume(args)
    if not args.data or not args.out:
        raise LlmosError("pretrain needs DATA and --out RUN (or --resume RUN)")
    from llmos.train.run import pretrain

    overrides = {k: getattr(args, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len")}
    cfg = _train_config(args, args.lr, overrides["max_seq_len"] or _preset_context(args.size))
    return _until_done_or_stopped(args, lambda: pretrain(
        args.data, args.out, size=args.size, arch=args.arch, tokenizer=args.tokenizer, vocab_size=args.vocab,
        model_overrides=overrides, cfg=cfg, device=args.device, progress=not args.quiet, restart=args.restart))


def _preset_context(size: str) -> int | None:
    from llmos.train.presets import PRESETS

    return PRESETS.get(size, {}).get("max_seq_len")


def run_finetune(args: argparse.Namespace) -> int:
    if args.resume:
        return _resume(args)
    if not args.base or not args.data or not args.out:
        raise LlmosError("finetune needs BASE, --data FILES and --out RUN (or --resume RUN)")
    from llmos.models.lora import LoraConfig
    from llmos.train.run import base_config, finetune

    lora = None
    if args.lora:
        targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
        lora = LoraConfig(rank=args.rank, alpha=args.alpha, dropout=args.dropout, targets=targets)
    elif args.merge or args.targets:
        raise LlmosError("--merge and --targets apply to LoRA: add --lora")
    lr = args.lr if args.lr is not None else (2e-4 if lora else 3e-5)
    cfg = _train_config(args, lr, base_config(args.base).max_seq_len)
    return _until_done_or_stopped(args, lambda: finetune(
        args.base, args.data, args.out, lora=lora, merge=args.merge, cfg=cfg, device=args.device,
        progress=not args.quiet, restart=args.restart))


def run_eval(args: argparse.Namespace) -> int:
    from llmos.train.evaluate import perplexity
    from llmos.train.run import is_run, load_base, load_model

    rows = []
    base = load_base(args.model) if is_run(args.model) else None
    if base is not None:
        rows.append((f"{base.name} (before)", perplexity(base.model, base.tokenizer, args.data, args.seq_len, args.batch_size)))
        del base
    loaded = load_model(args.model)
    label = f"{loaded.name} (after)" if rows else loaded.name
    rows.append((label, perplexity(loaded.model, loaded.tokenizer, args.data, args.seq_len, args.batch_size)))
    width = max(len(name) for name, _ in rows) + 2
    print(f"{'model':<{width}}{'tokens':>10}{'loss':>10}{'perplexity':>12}")
    for name, r in rows:
        print(f"{name:<{width}}{r.tokens:>10}{r.loss:>10.4f}{r.ppl:>12.3f}")
    if len(rows) == 2:
        (_, a), (_, b) = rows
        print(f"{'change':<{width}}{'':>10}{b.loss - a.loss:>+10.4f}{(b.ppl / a.ppl - 1) * 100:>+11.1f}%")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from llmos.train.run import load_model
    from llmos.weights.export import save_gguf, save_hf

    loaded = load_model(args.model)
    if args.format == "hf":
        out = save_hf(loaded.model, loaded.config, loaded.tokenizer, args.out)
    else:
        out = Path(args.out)
        if out.suffix.lower() != ".gguf":
            out = out / f"{Path(str(args.model).rstrip('/')).stem or 'model'}-{args.qtype}.gguf"
        out = save_gguf(loaded.model, loaded.config, loaded.tokenizer, out, args.qtype)
    print(f"wrote {out}", file=sys.stderr)
    return 0
