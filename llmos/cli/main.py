"""`llmos` command line: a thin layer over the Python API.

Each subcommand group lives in its own module exposing `add_parsers(subparsers)`, which registers its
subcommands with `set_defaults(func=...)`; `func(args) -> int` is the exit status. Errors that are the
user's to fix (`LlmosError` and ValueError) print one line and exit 1, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from llmos.threads import auto_threads, mark_auto

# Subcommand groups, imported lazily so `llmos --help` stays fast.
_GROUPS = ("llmos.cli.store", "llmos.cli.generate", "llmos.cli.bench", "llmos.cli.train", "llmos.cli.index", "llmos.cli.serve", "llmos.cli.text")


class Parser(argparse.ArgumentParser):
    """Usage errors in one line naming the flag, with where to read more (argparse prints the whole
    usage first, which buries the one line that matters)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from llmos import __version__

    parser = Parser(prog="llmos", description="Run, adapt and serve open LLMs offline.")
    parser.add_argument("--version", action="version", version=f"llmos {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _GROUPS:
        importlib.import_module(module).add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Read by OpenMP when torch is first imported, so set before any command imports it.
    threads = getattr(args, "threads", None)
    if "torch" not in sys.modules and (threads or "OMP_NUM_THREADS" not in os.environ):
        os.environ["OMP_NUM_THREADS"] = str(threads or auto_threads())
        if not threads:
            mark_auto()  # looked at again before each generation (llmos/threads.py)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # `llmos list | head`: the reader left; that is not an error to report
        # Python flushes stdout again at exit; point it at /dev/null so that flush cannot fail too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, OSError) as exc:  # LlmosError is a ValueError
        print(f"llmos: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
