"""`llmos generate` (stream a continuation) and `llmos chat` (an interactive terminal chat)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from llmos.cli.argtypes import DTYPES, int_in
from llmos.files import write_atomically


def add_model_args(p: argparse.ArgumentParser, default: str = "smollm2-135m-instruct") -> None:
    p.add_argument("--model", "-m", default=default, help=f"store name, .gguf file or Hugging Face folder (default {default})")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="weight form; auto picks the fastest within 2%% of fp32 perplexity")
    p.add_argument("--threads", type=int_in(1), default=None, help="CPU threads (default: the cores other work leaves idle)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", "-n", type=int_in(1), default=None, help="tokens to generate at most")
    p.add_argument("--temperature", "-t", type=float, default=None, help="0 is greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=None, help="0 turns it off (default 40)")
    p.add_argument("--top-p", type=float, default=None, help="1 turns it off (default 0.95)")
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--presence-penalty", type=float, default=None)
    p.add_argument("--frequency-penalty", type=float, default=None)
    p.add_argument("--no-repeat-ngram-size", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="same seed, same output")
    p.add_argument("--num-beams", type=int, default=None, help="beam search with this many beams")
    p.add_argument("--repetition-guard", action="store_true", help="end a degenerate repetition loop")


_CONTROL_ARGS = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty", "no_repeat_ngram_size", "stop", "seed", "num_beams")


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    out = {k: getattr(args, k) for k in _CONTROL_ARGS if getattr(args, k) is not None}
    if args.repetition_guard:
        out["repetition_guard"] = True
    if getattr(args, "json_schema", None) is not None:
        out["response_format"] = json_schema_format(args.json_schema)
    return out


def add_json_schema_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json-schema", type=Path, default=None, metavar="FILE",
                   help="constrain the output to JSON matching the schema in FILE ('{}' for any object)")


def json_schema_format(path: Path) -> dict[str, Any]:
    """The response_format for a JSON schema file (the controls' own, so llm.generate checks it)."""
    from llmos.errors import LlmosError

    try:
        schema = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise LlmosError(f"--json-schema {path}: cannot read a JSON schema: {exc}") from None
    if schema == {}:
        return {"type": "json_object"}
    return {"type": "json_schema", "json_schema": {"name": path.stem, "schema": schema}}


def load_model(args: argparse.Namespace):
    """The model the flags name; its first load says what it is doing on stderr unless --quiet."""
    import llmos

    return llmos.load(args.model, dtype=args.dtype, threads=args.threads, quiet=getattr(args, "quiet", False))


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="continue a prompt, streaming tokens to stdout")
    p.add_argument("prompt", help="text to continue ('-' reads stdin)")
    add_model_args(p)
    add_sampling_args(p)
    add_json_schema_arg(p)
    p.add_argument("--quiet", "-q", action="store_true", help="nothing on stderr, even on a model's first load")
    p.set_defaults(func=run_generate)
    c = sub.add_parser("chat", help="interactive chat in the terminal")
    add_model_args(c)
    add_sampling_args(c)
    add_json_schema_arg(c)
    c.add_argument("--system", default=None, help="system prompt")
    c.set_defaults(func=run_chat)


def run_generate(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    llm = load_model(args)
    stream = llm.stream(prompt, **sampling_kwargs(args))  # validates before printing anything
    sys.stdout.write(prompt)
    sys.stdout.flush()
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


CHAT_HELP = """commands: /system TEXT (set the system prompt and start over), /reset, /save FILE, /load FILE, /exit
Ctrl-C stops a reply; Ctrl-D or /exit leaves."""


def chat_controls(model_path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The REPL's controls: the model's recommended sampling and the loop guard, under the flags given."""
    from llmos import store

    return {"repetition_guard": True, **store.recommended_sampling(model_path), **sampling_kwargs(args)}


def run_chat(args: argparse.Namespace) -> int:
    llm = load_model(args)
    session = llm.session(args.system, **chat_controls(llm.path, args))
    print(f"llmos chat with {llm.path.name} ({llm.dtype}). {CHAT_HELP}", flush=True)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            continue
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if chat_command(session, line):
                return 0
            continue
        stream = session.send(line)
        try:
            for piece in stream:
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            stream.close()  # the partial reply stays in the history
            sys.stdout.write(" [stopped]")
        sys.stdout.write("\n")
        sys.stdout.flush()


def chat_command(session, line: str) -> bool:
    """Run one /command; True means leave."""
    cmd, _, rest = line.partition(" ")
    rest = rest.strip()
    if cmd in ("/exit", "/quit", "/bye"):
        return True
    if cmd == "/reset":
        session.reset(_system_of(session))
        print("history cleared")
    elif cmd == "/system":
        session.reset(rest or None)
        print("system prompt set; history cleared" if rest else "system prompt removed; history cleared")
    elif cmd == "/save" and rest:
        try:
            write_atomically(Path(rest), json.dumps(session.save(), ensure_ascii=False, indent=2))
        except OSError as exc:
            print(f"could not save to {rest}: {exc}")
            return False
        print(f"saved {len(session.messages)} messages to {rest}")
    elif cmd == "/load" and rest:
        try:
            with open(rest, encoding="utf-8") as f:
                messages = json.load(f)
            if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
                raise ValueError("expected a JSON list of {role, content} messages")
        except (OSError, ValueError) as exc:
            print(f"could not load {rest}: {exc}")
            return False
        session.load(messages)
        print(f"loaded {len(messages)} messages from {rest}")
    else:
        print(CHAT_HELP)
    return False


def _system_of(session) -> str | None:
    first = session.messages[0] if session.messages else None
    return first["content"] if first and first["role"] == "system" else None
