"""Text to summarize or translate, from a file or standard input, with one-line errors for bad input.

Files are read by the ingestion module (`llmos.tasks.ingest`): plain text and Markdown come back as
the file's own text; HTML and PDF as their visible text, rebuilt as Markdown-like text with the
headings ingestion found (`# Title`), so summarization can split on them. Missing files, binary
files, unsupported types, empty input and input over MAX_TEXT_BYTES are refused with an LlmosError:
summarizing or translating holds the whole text (and a model call per part of it), so past that size
the answer is to split the file, or to index it and ask questions of it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import BinaryIO

from llmos.errors import LlmosError
from llmos.tasks import ingest

MAX_TEXT_BYTES = 10_000_000  # 10 MB: ~2.5M tokens, thousands of model calls to summarize on a laptop


def _too_large(where: str, size: int | None) -> LlmosError:
    got = f" ({where} is {size / 1e6:.1f} MB)" if size is not None else f" ({where} is larger)"
    return LlmosError(f"summarize and translate take at most {MAX_TEXT_BYTES / 1e6:.0f} MB of text{got}; split it, "
                      "or index it (llmos index add) and ask questions of it")


def read_file(path: str | Path) -> str:
    """The text of a .txt/.md/.html/.pdf file (see the module docstring)."""
    path = Path(path)
    if path.is_dir():
        raise LlmosError(f"{path} is a folder: give one file")
    if path.is_file() and path.stat().st_size > MAX_TEXT_BYTES:
        raise _too_large(str(path), path.stat().st_size)
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
    data = (stream or sys.stdin.buffer).read(MAX_TEXT_BYTES + 1)
    if len(data) > MAX_TEXT_BYTES:
        raise _too_large("standard input", None)
    return require_text(ingest.decode(data, "standard input looks like binary data, not text"), "standard input")


def read_input(arg: str) -> str:
    """`-` reads standard input; anything else is a file path."""
    return read_stdin() if arg == "-" else read_file(arg)


def require_text(text: str, where: str = "the input") -> str:
    if not text or not text.strip():
        raise LlmosError(f"{where} is empty: there is no text to work on")
    return text
