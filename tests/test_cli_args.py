"""Command-line flags reach the generation controls (no model needed)."""

from __future__ import annotations

from llmos.cli.generate import sampling_kwargs
from llmos.cli.main import build_parser
from llmos.tasks.qa import DEFAULT_MAX_NEW_TOKENS


def test_ask_takes_the_shared_sampling_flags_and_answers_greedily_by_default():
    args = build_parser().parse_args(["ask", "What is a list?"])
    assert sampling_kwargs(args) == {"temperature": 0.0, "max_new_tokens": DEFAULT_MAX_NEW_TOKENS}  # short answers
    args = build_parser().parse_args(["ask", "Q", "-t", "0.7", "--top-p", "0.9", "--min-p", "0.05", "-n", "32"])
    assert sampling_kwargs(args) == {"temperature": 0.7, "top_p": 0.9, "min_p": 0.05, "max_new_tokens": 32}
