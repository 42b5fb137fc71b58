"""The `llmos eval` group, shared by the modules that add a metric to it.

argparse registers a subcommand name once, so every module that adds `llmos eval METRIC` gets the
group's subparsers here: `get_eval_subparsers(sub).add_parser("METRIC", ...)`. The first caller
creates the group; later callers (or a group another module created itself) get the same one.
"""

from __future__ import annotations

import argparse


def get_eval_subparsers(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """The subparsers of `llmos eval`, created on first use."""
    parser = sub.choices.get("eval")
    if parser is None:
        parser = sub.add_parser("eval", help="evaluate models: perplexity, retrieval, summaries, translations")
        return parser.add_subparsers(dest="eval_command", metavar="METRIC")
    # argparse keeps a parser's subcommands among its actions; there is no public accessor.
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
