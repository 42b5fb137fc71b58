"""`llmos pull | list | show | rm`: the model store from the command line (see `llmos.store`)."""

from __future__ import annotations

import argparse
import json

from llmos import store


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pull", help="download a built-in model into the store")
    p.add_argument("name", help=f"one of: {', '.join(store.DEFAULT_MODELS)}")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("add", help="copy a local .gguf file or Hugging Face folder into the store under a name")
    p.add_argument("path")
    p.add_argument("--name", required=True, help="the name to use it by, e.g. gpt2")
    p.set_defaults(func=cmd_add)

    p = sub.add_parser("list", help="list the models in the store")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("show", help="describe a model: architecture, parameters, quantization, context")
    p.add_argument("model", metavar="NAME_OR_PATH", help="a store name, a .gguf file or a Hugging Face folder")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("rm", help="remove a model from the store, with its converted copies")
    p.add_argument("name")
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser("prune", help="free converted copies and verdicts of models that are gone or changed")
    p.set_defaults(func=cmd_prune)


def cmd_pull(args: argparse.Namespace) -> int:
    path = store.pull(args.name)
    print(f"{args.name}: {path}")
    return 0


def cmd_add(args: argparse.Namespace) -> int:
    path = store.add(args.path, args.name)
    print(f"{args.name}: {path}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from llmos import derived

    models = store.list_models()
    if not models:
        print(f"no models in {store.home() / 'models'}; pull one with: llmos pull {store.DEFAULT_CHAT_MODEL}")
    else:
        _table([("NAME", "KIND", "SIZE", "PATH")] + [(m.name, m.kind, human_size(m.size), str(m.path)) for m in models])
    extra = derived.entries()
    if extra:  # what loads made beside the models: never hidden, freed by rm and prune
        print(f"\nconverted copies and quality verdicts in {store.home()} ({human_size(sum(d.size for d in extra))}; "
              "`llmos prune` frees those of models that are gone):")
        _table([("KEY", "FILES", "SIZE", "MODEL")] + [
            (d.key, " ".join(f.name.removeprefix(d.key + "-") for f in d.files), human_size(d.size),
             ", ".join(d.sources) or "(gone)") for d in extra])
    return 0


def _table(rows: list[tuple[str, str, str, str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[3])


def cmd_show(args: argparse.Namespace) -> int:
    info = store.show(args.model)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    quant = ", ".join(f"{name} x{count}" for name, count in info["quantization"].items())
    lines = [
        ("path", info["path"]),
        ("kind", info["kind"]),
        ("architecture", info["architecture"]),
        ("parameters", f"{info['parameters'] / 1e6:.1f}M ({info['parameters']:,})"),
        ("tensor types", quant or "-"),
        ("context length", info["context_length"] if info["context_length"] is not None else "-"),
        ("file size", human_size(info["file_size"])),
        ("chat template", "yes" if info["chat_template"] else "no"),
    ]
    if info.get("license"):
        lines.append(("license", info["license"]))
    for label, value in lines:
        print(f"{label:<15} {value}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    from llmos import derived

    try:
        freed = derived.forget(store.resolve(args.name, pull_missing=False)) if "/" not in args.name else 0
    except (ValueError, OSError):  # not in the store: store.remove says so
        freed = 0
    store.remove(args.name)
    print(f"removed {args.name}" + (f" and {human_size(freed)} of converted copies" if freed else ""))
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from llmos import derived

    print(f"freed {human_size(derived.prune())}")
    return 0


def human_size(n: int) -> str:
    """Bytes as a short decimal size: 98.4 MB."""
    if n < 1000:
        return f"{n} B"
    size = float(n)
    for unit in ("kB", "MB", "GB", "TB"):
        size /= 1000
        if size < 1000 or unit == "TB":
            break
    return f"{size:.1f} {unit}"
