"""Text to summarize or translate, from a file or standard input, with one-line errors for bad input.

Files are read by the ingestion module (`llmos.tasks.ingest`): plain text and Markdown come back as
the file's own text; HTML and PDF as their visible text, rebuilt as Markdown-like text with the
headings ingestion found (`# Title`), so summarization can split on them. Missing files, binary
files, unsupported types and empty input are refused with an LlmosError.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import BinaryIO

from llmos.errors import LlmosError
from llmos.tasks import ingest


def read_file(path: str | Path) -> str:
    """The text of a .txt/.md/.html/.pdf file (see the module docstring)."""
    path = Path(path)
    if path.is_dir():
        raise LlmosError(f"{path} is a folder: give one file")
    document = ingest.extract(path)  # missing file, unsupported type, binary content: LlmosError
    if document.kind in ("text", "markdown"):
        text = document.text
    else:
        text = blocks_as_text(document.blocks)
    return require_text(text, str(path))


def blocks_as_text(blocks: list[ingest.Block]) -> str:
    """Blocks as Markdown-like text: a `#` heading line wherever the heading path changes."""
    out: list[str] = []
    current: tuple[str, ...] = ()
    for block in blocks:
        if block.heading != current:
            shared = 0
            while shared < min(len(current), len(block.heading)) and current[shared] == block.heading[shared]:
                shared += 1
            for level in range(shared, len(block.heading)):
                out.append("#" * min(level + 1, 6) + " " + block.heading[level])
            current = block.heading
        out.append(block.text.strip())
    return "\n\n".join(out)


def read_stdin(stream: BinaryIO | None = None) -> str:
    """All of standard input as text (UTF-8, or cp1252 for legacy text); binary data is refused."""
    data = (stream or sys.stdin.buffer).read()
    return require_text(ingest.decode(data, "standard input looks like binary data, not text"), "standard input")


def read_input(arg: str) -> str:
    """`-` reads standard input; anything else is a file path."""
    return read_stdin() if arg == "-" else read_file(arg)


def require_text(text: str, where: str = "the input") -> str:
    if not text or not text.strip():
        raise LlmosError(f"{where} is empty: there is no text to work on")
    return text
