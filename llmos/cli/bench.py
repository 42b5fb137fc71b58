"""`llmos bench`: speed of each weight form on this machine, and with --quality, the quality report
(perplexity and top-1 agreement with fp32) that `--dtype auto` decides from."""

from __future__ import annotations

import argparse
import json

from llmos.cli.argtypes import int_in


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure decode/prefill speed per weight form (--quality: perplexity report)")
    p.add_argument("--model", "-m", default="smollm2-135m-instruct")
    p.add_argument("--forms", default=None,
                   help="comma-separated weight forms (default: fp32,bf16,int8,int4, and gguf for a quantized GGUF file)")
    p.add_argument("--quality", action="store_true", help="report perplexity and top-1 agreement per form")
    p.add_argument("--tokens", type=int_in(1), default=64, help="decode tokens to time")
    p.add_argument("--threads", type=int_in(1), default=None, help="CPU threads (default: the cores other work leaves idle)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llmos import quality, store
    from llmos.engine import native

    path = store.resolve(args.model)
    forms = [f.strip() for f in args.forms.split(",") if f.strip()] if args.forms else list(quality.forms_of(path))
    kernels = native.kernels()
    native.keep_freed_memory()  # as a served model runs (engine/native.py)
    decode_step = "native (C++)" if kernels.name == "native" else f"Python ({native.failure() or 'LLMOS_NATIVE=0'})"
    speed = {f: quality.speed(path, f, args.tokens, kernels) for f in forms}
    result: dict = {"model": str(path), "decode_step": decode_step, "speed": speed}
    if args.quality:
        result["quality"] = quality.report(path, forms=tuple(forms), kernels=kernels)
        result["auto"] = quality.auto_form(path, kernels=kernels)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"decode step: {decode_step}")
    print(f"{'form':<6}{'load s':>9}{'prefill tok/s':>15}{'decode tok/s':>14}" + ("{:>12}{:>10}{:>8}".format("perplexity", "vs fp32", "top-1") if args.quality else ""))
    for f in forms:
        s = result["speed"][f]
        line = f"{f:<6}{s['load_s']:>9.2f}{s['prefill_tps']:>15.0f}{s['decode_tps']:>14.1f}"
        if args.quality:
            q = result["quality"][f]
            line += f"{q['perplexity']:>12.3f}{q['ppl_increase'] * 100:>+9.2f}%{q['top1_agreement']:>8.3f}"
        print(line)
    if args.quality:
        why = ("the file's own blocks: a quantized GGUF whose layers are not Q4_1" if result["auto"] == "gguf"
               else f"fastest within {quality.MAX_PPL_INCREASE:.0%} of fp32 perplexity")
        print(f"auto picks: {result['auto']} ({why})")
    return 0
