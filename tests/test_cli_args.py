"""Command-line flags reach the generation controls (no model needed)."""

from __future__ import annotations

import json
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


def test_json_schema_reaches_the_controls_as_a_response_format(tmp_path):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    (tmp_path / "point.json").write_text(json.dumps(schema))
    (tmp_path / "any.json").write_text("{}")
    args = build_parser().parse_args(["generate", "x", "--json-schema", str(tmp_path / "point.json")])
    assert sampling_kwargs(args)["response_format"] == {"type": "json_schema",
                                                        "json_schema": {"name": "point", "schema": schema}}
    args = build_parser().parse_args(["chat", "--json-schema", str(tmp_path / "any.json")])
    assert sampling_kwargs(args)["response_format"] == {"type": "json_object"}


def test_json_schema_constrains_the_generated_text(llmos_run, tmp_path, default_gguf_path):
    schema = {"type": "object", "required": ["name"], "additionalProperties": False,
              "properties": {"name": {"type": "string", "maxLength": 12}}}
    (tmp_path / "s.json").write_text(json.dumps(schema))
    out = llmos_run("generate", "A person:", "-t", "0", "-n", "40", "--model", default_gguf_path,
                    "--json-schema", str(tmp_path / "s.json"))
    assert out.returncode == 0, out.stderr
    assert list(json.loads(out.stdout[len("A person:"):])) == ["name"]
