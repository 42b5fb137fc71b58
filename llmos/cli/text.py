"""`llmos summarize`, `llmos translate`, `llmos eval summarize`, `llmos eval translate`.

Thin commands over `llmos.tasks.summarize`, `llmos.tasks.translate` and `llmos.tasks.evaluate_text`.
Input and languages are checked before the model loads, so bad input fails at once, in one line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llmos.cli.eval import get_eval_subparsers
from llmos.cli.generate import add_model_args, load_model
from llmos.errors import LlmosError
from llmos.files import write_atomically

TRANSLATE_MODEL = "gemma3-270m"  # llmos.tasks.translate.DEFAULT_MODEL, named here so --help imports no torch


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("summarize", help="summarize a document of any length (.txt, .md, .html, .pdf or stdin)")
    p.add_argument("file", metavar="FILE|-", help="file to summarize ('-' reads stdin)")
    p.add_argument("--words", "-w", type=int, default=150, help="length of the summary in words (default 150)")
    p.add_argument("--style", choices=["paragraph", "bullets"], default="paragraph")
    p.add_argument("--chunk-tokens", type=int, default=None, help="largest part summarized at once (default 2048)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    add_model_args(p)
    p.set_defaults(func=cmd_summarize)

    p = sub.add_parser("translate", help="translate text or Markdown, keeping its structure and code")
    p.add_argument("text", nargs="?", default="-", metavar="TEXT|FILE|-", help="text, a file, or '-' for stdin (default)")
    p.add_argument("--to", "-t", default="en", metavar="LANG", help="target language: name or ISO code (default en)")
    p.add_argument("--from", "-f", dest="source", default=None, metavar="LANG", help="source language (default: detected)")
    p.add_argument("--beams", "-b", type=int, default=4, help="beam search width; 1 is greedy (default 4)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar or notes")
    add_model_args(p, default=TRANSLATE_MODEL)
    p.set_defaults(func=cmd_translate)

    ev = get_eval_subparsers(sub)
    p = ev.add_parser("summarize", help="ROUGE-1/2/L of the model's summaries on a JSONL set")
    p.add_argument("set", nargs="?", default=None, metavar="FILE.jsonl", help="items {id, text, summary} (default: the shipped set)")
    p.add_argument("--words", type=int, default=None, help="summary length for items without their own 'words' (default 50)")
    _eval_args(p)
    p.set_defaults(func=cmd_eval, task="summarize")
    p = ev.add_parser("translate", help="chrF and BLEU of the model's translations on a JSONL set")
    p.add_argument("set", nargs="?", default=None, metavar="FILE.jsonl",
                   help="items {id, source, target, text, reference} (default: the shipped set)")
    p.add_argument("--beams", type=int, default=4, help="beam search width (default 4)")
    _eval_args(p, default=TRANSLATE_MODEL)
    p.set_defaults(func=cmd_eval, task="translate")


def _eval_args(p: argparse.ArgumentParser, default: str = "smollm2-135m-instruct") -> None:
    p.add_argument("--limit", type=int, default=None, help="score only the first N items")
    p.add_argument("--out", "-o", default=None, help="also write the JSON report (scores and every output) to this file")
    add_model_args(p, default=default)


def _progress(args: argparse.Namespace) -> bool:
    return not getattr(args, "quiet", False) and sys.stderr.isatty()


def cmd_summarize(args: argparse.Namespace) -> int:
    from llmos.tasks.summarize import summarize
    from llmos.tasks.textfiles import read_input

    text = read_input(args.file)
    llm = load_model(args)
    print(summarize(llm, text, words=args.words, style=args.style, chunk_tokens=args.chunk_tokens,
                    progress=_progress(args)))
    return 0


def cmd_translate(args: argparse.Namespace) -> int:
    from llmos.tasks import languages
    from llmos.tasks.textfiles import read_file, read_stdin, require_text
    from llmos.tasks.translate import detect_source, translate

    target = languages.resolve(args.to)
    source = languages.resolve(args.source) if args.source else None
    if args.text == "-":
        if sys.stdin.isatty():
            raise LlmosError("give the text to translate, or pipe it in: llmos translate --to fr < FILE")
        text = read_stdin()
    elif _is_file(args.text):
        text = read_file(args.text)
    else:
        text = require_text(args.text)
    source = source or detect_source(text)  # before the model loads: undetectable text fails at once
    llm = _load_translator(args)
    note = languages.support_note(llm, source, target)
    if note and not args.quiet:  # said before the wait, not after
        print(f"llmos: note: {note}", file=sys.stderr, flush=True)
    result = translate(llm, text, to=target, source=source, beams=args.beams, progress=_progress(args))
    sys.stdout.write(result if result.endswith("\n") else result + "\n")
    return 0


def _load_translator(args: argparse.Namespace):
    """The translation model; the built-in one must be pulled first (one line saying how), never
    downloaded as a side effect of translating."""
    from llmos import store

    if args.model == TRANSLATE_MODEL:
        store.resolve(args.model, pull_missing=False)
    return load_model(args)


def _is_file(arg: str) -> bool:
    try:
        return "\n" not in arg and Path(arg).is_file()
    except OSError:  # a text too long to be a file name
        return False


def cmd_eval(args: argparse.Namespace) -> int:
    from llmos.tasks import evaluate_text as ev

    path = Path(args.set) if args.set else ev.shipped(args.task)
    items = ev.load_items(path, args.task)
    if args.limit is not None:
        if args.limit < 1:
            raise LlmosError(f"--limit must be at least 1, got {args.limit}")
        items = items[: args.limit]
    needs_model = any(not isinstance(item.get("prediction"), str) for item in items)
    llm = (_load_translator(args) if args.task == "translate" else load_model(args)) if needs_model else None
    if args.task == "summarize":
        report = ev.evaluate_summaries(llm, items, words=args.words, progress=_progress(args))
    else:
        report = ev.evaluate_translations(llm, items, beams=args.beams, progress=_progress(args))
    report["set"] = str(path)
    report["model"] = str(llm.path) if llm is not None else None
    if args.out:  # only when asked: nothing lands in the current folder unasked
        write_atomically(Path(args.out), json.dumps(report, ensure_ascii=False, indent=2) + "\n")
    source = f"model {llm.path.name}" if llm is not None else "the set's predictions"
    print(f"{path.name}: {report['items']} items, {source}, {report['seconds']:.1f} s")
    print(ev.format_table(report))
    if args.out:
        print(f"wrote {args.out}")
    return 0
