"""Command-line flags reach the generation controls (no model needed)."""

from __future__ import annotations

from pathlib import Path

from llmos.cli.generate import sampling_kwargs
from llmos.cli.main import build_parser
from llmos.tasks.qa import DEFAULT_MAX_NEW_TOKENS


def test_ask_takes_the_shared_sampling_flags_and_answers_greedily_by_default():
    args = build_parser().parse_args(["ask", "What is a list?"])
    assert sampling_kwargs(args) == {"temperature": 0.0, "max_new_tokens": DEFAULT_MAX_NEW_TOKENS}  # short answers
    args = build_parser().parse_args(["ask", "Q", "-t", "0.7", "--top-p", "0.9", "--min-p", "0.05", "-n", "32"])
    assert sampling_kwargs(args) == {"temperature": 0.7, "top_p": 0.9, "min_p": 0.05, "max_new_tokens": 32}


def test_the_chat_repl_uses_the_models_recommended_sampling_and_the_loop_guard(default_gguf_path):
    from llmos.cli.generate import chat_controls

    args = build_parser().parse_args(["chat"])
    controls = chat_controls(Path(default_gguf_path), args)
    assert controls["repetition_guard"] is True
    assert controls["temperature"] == 0.2 and controls["top_p"] == 0.9  # SmolLM2's card
    args = build_parser().parse_args(["chat", "-t", "0.9"])
    assert chat_controls(Path(default_gguf_path), args)["temperature"] == 0.9  # a flag wins
