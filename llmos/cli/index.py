"""`llmos index add|list|remove|stats`, `llmos search`, `llmos ask`, `llmos embed`, `llmos eval retrieval`.

Thin commands over `llmos.tasks.index.Index`, `llmos.tasks.qa.ask`, `llmos.tasks.embed.Embedder` and
`llmos.tasks.evaluate_retrieval`. Every command takes `--index PATH` (default
$LLMOS_HOME/indexes/default.sqlite); only `index add` creates an index.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from llmos import store
from llmos.cli.argtypes import DTYPES
from llmos.cli.eval import get_eval_subparsers
from llmos.cli.generate import add_sampling_args, sampling_kwargs
from llmos.errors import LlmosError
from llmos.tasks.qa import DEFAULT_K, DEFAULT_MAX_NEW_TOKENS

MODES = ("vector", "keyword", "hybrid")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("index", help="build and inspect a search index over your documents")
    isub = p.add_subparsers(dest="index_command", metavar="ACTION", required=True)
    a = isub.add_parser("add", help="index files and folders (txt, md, html, pdf); re-running adds only what changed")
    a.add_argument("paths", nargs="+", metavar="PATH")
    a.add_argument("--embed-model", default=None, help=f"embedding model for a new index (default {store.DEFAULT_EMBED_MODEL})")
    a.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    a.set_defaults(func=cmd_add)
    a = isub.add_parser("list", help="list the indexed documents")
    a.set_defaults(func=cmd_list)
    a = isub.add_parser("remove", help="drop documents (a folder drops everything under it)")
    a.add_argument("paths", nargs="+", metavar="PATH")
    a.set_defaults(func=cmd_remove)
    a = isub.add_parser("stats", help="documents, chunks, model, size, and ANN recall@10")
    a.add_argument("--check-ann", action="store_true", help="measure ANN recall@10 even below the ANN threshold")
    a.add_argument("--json", action="store_true", help="print JSON")
    a.set_defaults(func=cmd_stats)
    for a in isub.choices.values():
        _index_arg(a)

    p = sub.add_parser("search", help="ranked passages for a query: score, file, line range, text")
    p.add_argument("query")
    p.add_argument("-k", type=int, default=5, help="passages to show")
    p.add_argument("--mode", choices=MODES, default="hybrid")
    p.add_argument("--json", action="store_true", help="print JSON lines")
    _index_arg(p)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("ask", help="answer a question from your indexed documents, citing them")
    p.add_argument("question")
    p.add_argument("-k", type=int, default=DEFAULT_K, help="passages to retrieve")
    p.add_argument("--mode", choices=MODES, default="hybrid")
    p.add_argument("--no-index", action="store_true", help="plain chat question answering, no documents")
    p.add_argument("--stream", action="store_true", help="print the answer as soon as it is checked")
    p.add_argument("--extractive", action="store_true", help="answer with the best sentence, without the chat model")
    p.add_argument("--json", action="store_true", help="print the answer, its sources and quotes as JSON")
    p.add_argument("--model", "-m", default=store.DEFAULT_CHAT_MODEL, help="chat model: store name, .gguf file or HF folder")
    add_sampling_args(p)
    p.set_defaults(temperature=0.0, max_new_tokens=DEFAULT_MAX_NEW_TOKENS)  # short greedy answers unless asked otherwise
    p.add_argument("--dtype", default="auto", choices=DTYPES)
    _index_arg(p)
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("embed", help="print sentence embeddings as JSON lines")
    p.add_argument("text", metavar="TEXT|FILE", help="a text, a file (one text per line), or '-' for stdin lines")
    p.add_argument("--model", "-m", default=store.DEFAULT_EMBED_MODEL, help="BERT-family model: store name or HF folder")
    p.add_argument("--batch-size", type=int, default=32)
    p.set_defaults(func=cmd_embed)

    e = get_eval_subparsers(sub).add_parser("retrieval", help="recall@1/3/10 and MRR per search mode on question sets")
    e.add_argument("questions", nargs="?", default=None, metavar="QA.jsonl",
                   help="question set (default: every shipped development set, each corpus indexed on first use)")
    e.add_argument("--index", default=None, help="index to evaluate (required with your own question set)")
    e.add_argument("--tune", action="store_true", help="score the hybrid fusion's settings (RRF k, vector weight) instead")
    e.add_argument("--modes", default=",".join(MODES), help="comma-separated modes")
    e.add_argument("--quiet", "-q", action="store_true", help="no progress bar while the shipped corpus is indexed")
    e.set_defaults(func=cmd_eval_retrieval)

    e = get_eval_subparsers(sub).add_parser("qa", help="correct answers, right citations, declines and loops of `ask`")
    e.add_argument("questions", nargs="*", metavar="QA.jsonl",
                   help="question sets (default: the shipped development sets, their documents indexed on first use)")
    e.add_argument("--index", default=None, help="index the questions are about (default: the documents named by the set)")
    e.add_argument("--model", "-m", default=store.DEFAULT_CHAT_MODEL, help="chat model: store name, .gguf file or HF folder")
    e.add_argument("--dtype", default="auto", choices=DTYPES)
    e.add_argument("-k", type=int, default=DEFAULT_K, help="passages to retrieve")
    e.add_argument("--extractive", action="store_true", help="answer with the best sentence, without the chat model")
    e.add_argument("--out", default=None, metavar="FILE.json", help="write every answer and the summary as JSON")
    e.set_defaults(func=cmd_eval_qa)


def _index_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", default=None, metavar="PATH", help="index file (default $LLMOS_HOME/indexes/default.sqlite)")


def _open(path: str | None, *, create: bool = False, embedder: str | None = None):
    from llmos.tasks.index import Index, default_index_path

    file = Path(path).expanduser() if path else default_index_path()
    if not create and not file.is_file():
        raise LlmosError(f"no index at {file}: create one with `llmos index add PATH...`")
    return Index(file, embedder)


def cmd_add(args: argparse.Namespace) -> int:
    from llmos.tasks.index import default_index_path

    new = not (Path(args.index).expanduser() if args.index else default_index_path()).exists()
    index = _open(args.index, create=True, embedder=args.embed_model)
    try:
        report = index.add(args.paths, progress=not args.quiet)
    except BaseException:
        if new:
            _discard(index)
        raise
    print(f"{len(report.added)} added, {len(report.updated)} updated, {len(report.unchanged)} unchanged, "
          f"{len(report.removed)} removed; {report.embedded} chunks embedded")
    if report.split_blocks:
        print(f"{report.split_blocks} paragraphs were longer than the embedding model's {index.embedder.max_tokens} "
              "tokens and were split at sentence boundaries")
    if report.skipped:
        print(f"{report.skipped} files of unsupported types skipped")
    for path, reason in report.failed:
        print(f"failed: {path}: {reason}", file=sys.stderr)
    if new and not len(index):
        _discard(index)
        raise LlmosError(f"nothing was indexed, so no index was created at {index.path}")
    return 1 if report.failed else 0


def _discard(index) -> None:
    """Remove an index this command created, so a failed first `index add` leaves nothing behind."""
    index.close()
    for suffix in ("", "-wal", "-shm", ".usearch.json", ".bm25"):
        Path(f"{index.path}{suffix}").unlink(missing_ok=True)
    shutil.rmtree(f"{index.path}.usearch", ignore_errors=True)  # the HNSW graph's folder (tasks/ann.py)


def cmd_list(args: argparse.Namespace) -> int:
    docs = _open(args.index).documents()
    if not docs:
        print("the index is empty")
    for d in docs:
        print(f"{d.chunks:>6} chunks  {d.kind:<8}  {d.path}")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    removed = _open(args.index).remove(args.paths)
    for path in removed:
        print(f"removed {path}")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    stats = _open(args.index).stats(check_ann=args.check_ann)
    if args.json:
        print(json.dumps(stats.as_dict(), indent=2))
        return 0
    recall = f"{stats.ann_recall_at_10:.3f}" if stats.ann_recall_at_10 is not None else "not measured (use --check-ann)"
    for label, value in [("index", stats.path), ("documents", stats.documents), ("chunks", stats.chunks),
                         ("embedding model", stats.embed_model or "-"), ("dimensions", stats.dim or "-"),
                         ("file size", f"{stats.file_size / 1e6:.1f} MB"), ("split paragraphs", stats.split_blocks),
                         ("vector search", f"{stats.ann} (ANN from {stats.ann_threshold} chunks)"),
                         ("ANN recall@10", recall)]:
        print(f"{label:<17} {value}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    index = _open(args.index)
    if not len(index):
        raise LlmosError(f"the index {index.path} is empty: add documents with `llmos index add PATH...`")
    results = index.search(args.query, k=args.k, mode=args.mode)
    if not results:
        print("no results")
    for r in results:
        if args.json:
            print(json.dumps({"rank": r.rank, "score": r.score, "similarity": r.similarity, "path": r.path,
                              "line_start": r.line_start, "line_end": r.line_end, "page": r.page,
                              "heading": list(r.heading), "text": r.text}))
            continue
        heading = f"  [{' > '.join(r.heading)}]" if r.heading else ""
        print(f"{r.rank}. {r.score:.4f}  {r.location}{heading}")
        print("   " + r.text.strip().replace("\n", "\n   "))
        print()
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    import llmos
    from llmos.tasks.index import default_index_path
    from llmos.tasks.qa import ask

    index = None
    if not args.no_index:
        if args.index is None and not default_index_path().is_file():
            print(f"llmos: no index at {default_index_path()}; answering without documents", file=sys.stderr)
        else:
            index = _open(args.index)
    if args.extractive and index is None:
        raise LlmosError("--extractive answers from indexed documents: add some with `llmos index add PATH...`")
    llm = None
    if not args.extractive:
        _say("loading the chat model", args)
        llm = llmos.load(args.model, dtype=args.dtype)
    _say("searching the index and answering", args)
    result = ask(llm, args.question, index, k=args.k, mode=args.mode, stream=args.stream and not args.json,
                 generate=not args.extractive, **sampling_kwargs(args))
    if args.json:
        print(json.dumps(result.as_dict(), ensure_ascii=False, indent=2))
        return 0
    if args.stream:
        for piece in result:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        answer = result.answer
    else:
        answer = result
        print(answer)
    _print_sources(answer)
    return 0


def _say(what: str, args: argparse.Namespace) -> None:
    if not getattr(args, "json", False) or sys.stderr.isatty():
        print(f"llmos: {what}...", file=sys.stderr, flush=True)


def _print_sources(answer) -> None:
    """Each source the answer stands on with its quoted sentence and file:line (the closest sentences
    when the documents do not hold the answer)."""
    shown, title = (answer.cited, "Sources:") if answer.found else (answer.nearest, "Closest passages:")
    if not shown:
        return
    print("\n" + title)
    for s in shown:
        heading = f"  [{' > '.join(s.heading)}]" if s.heading else ""
        print(f"[{s.number}] {s.location}{heading}\n    \u201c{s.quote}\u201d")


def cmd_embed(args: argparse.Namespace) -> int:
    from llmos.tasks.embed import Embedder

    if args.text == "-":
        texts = [line for line in sys.stdin.read().splitlines() if line.strip()]
    elif Path(args.text).is_file():
        texts = [line for line in Path(args.text).read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        texts = [args.text]
    if not texts:
        raise LlmosError("nothing to embed: the input has no text")
    embedder = Embedder.load(args.model)
    out = embedder.embed(texts, batch_size=args.batch_size)
    truncated = set(out.truncated)
    for i, vector in enumerate(out.vectors):
        print(json.dumps({"index": i, "tokens": out.n_tokens[i], "truncated": i in truncated,
                          "embedding": [round(float(x), 7) for x in vector]}))
    if truncated:
        print(f"llmos: {len(truncated)} of {len(texts)} inputs were longer than {embedder.max_tokens} tokens "
              "and were truncated to fit the model", file=sys.stderr)
    return 0


def cmd_eval_retrieval(args: argparse.Namespace) -> int:
    from llmos.tasks import evaluate_retrieval as ev

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for mode in modes:
        if mode not in MODES:
            raise LlmosError(f"unknown search mode {mode!r}; use {', '.join(MODES)}")
    if args.questions is not None and args.index is not None:
        sets = [(args.questions, _open(args.index))]
    else:  # shipped sets (all of them by default) run on their own corpora, indexed once
        files = [args.questions] if args.questions is not None else [str(f) for f in ev.SHIPPED_SETS]
        sets = [(f, _shipped_index(f, args.quiet)) for f in files]
    loaded = [(f, index, ev.load_questions(f)) for f, index in sets]
    if args.tune:
        k, w = ev.current_fusion()
        results = ev.tune_fusion([(index, qs) for _, index, qs in loaded])
        print("hybrid fusion settings, best mean MRR first (" + ", ".join(Path(f).name for f, _, _ in loaded) + ")")
        for rk, rw, per_set in results[:8] + [r for r in results if (r[0], r[1]) == (k, w)]:
            mark = "  (current)" if (rk, rw) == (k, w) else ""
            cells = "  ".join(f"R@3 {s.recall[3]:.3f} MRR {s.mrr:.3f}" for s in per_set)
            print(f"k={rk:<5g} vector weight={rw:<5g} mean MRR {sum(s.mrr for s in per_set) / len(per_set):.3f}   {cells}{mark}")
        return 0
    for f, index, questions in loaded:
        scores = ev.evaluate(index, questions, modes)
        print(f"{Path(f).name}: {len(questions)} questions, index {index.path} ({len(index)} chunks)")
        print(ev.format_table(scores))
    return 0


def _shipped_index(file: str, quiet: bool):
    """The index of a shipped question set's documents, built (or brought up to date) on first use."""
    from llmos.tasks import evaluate_qa, evaluate_retrieval as ev
    from llmos.tasks.index import Index

    home = store.home() / "eval"
    corpus = evaluate_qa.corpus_of(file, home)
    if Path(file).resolve() == ev.SHIPPED_QA.resolve() or Path(file).stem.startswith("pydoc"):
        corpus, index = ev.write_pydoc_corpus(home / "pydoc_topics"), Index(home / "pydoc_topics.sqlite")
    elif corpus is None:
        raise LlmosError(f"{file}: give --index, the index its questions are about")
    else:
        index = Index(home / f"qa-{Path(file).stem}.sqlite")
    # The index holds this corpus only: a set's documents found at another place (another checkout
    # of llmos) would be retrieved twice.
    prefix = str(corpus.resolve()).rstrip(os.sep) + os.sep
    strays = [d.path for d in index.documents() if not d.path.startswith(prefix)]
    if strays:
        index.remove(strays)
    if not quiet and not len(index):
        print(f"indexing {corpus} for {Path(file).name} (once)", file=sys.stderr, flush=True)
    report = index.add([corpus], progress=not quiet)
    if report.embedded:
        print(f"indexed {len(report.added) + len(report.updated)} documents of {corpus} ({report.embedded} chunks)", file=sys.stderr)
    return index


def cmd_eval_qa(args: argparse.Namespace) -> int:
    import llmos
    from llmos.tasks import evaluate_qa as ev
    from llmos.tasks.qa import ask

    files = args.questions or sorted(str(p) for p in ev.SHIPPED_DIR.glob("*.jsonl"))
    if args.index and len(files) != 1:
        raise LlmosError("--index goes with one question file: the index is what that file's questions are about")
    sets = []
    for file in files:
        items = ev.load_items(file)
        # The shipped sets' indexes as `eval retrieval` keeps them: one corpus each, copies of it found
        # at another place (another checkout) removed, which this command used to keep and retrieve twice.
        index = _open(args.index) if args.index else _shipped_index(file, not sys.stderr.isatty())
        sets.append((Path(file).stem, items, index))
    llm = None if args.extractive else llmos.load(args.model, dtype=args.dtype)
    reports = []
    for name, items, index in sets:
        bar = _progress(f"asking {name}", len(items))
        report = ev.evaluate(lambda q: ask(llm, q, index, k=args.k, generate=not args.extractive), items, name,
                             progress=lambda done, total: bar.update(1))
        bar.close()
        print(ev.format_report(report))
        reports.append(report.as_dict())
    if args.out:
        from llmos.files import write_atomically

        write_atomically(Path(args.out), json.dumps(reports, indent=2, ensure_ascii=False))
        print(f"wrote {args.out}")
    return 0


def _progress(what: str, total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc=what, unit="q", file=sys.stderr, leave=False)
