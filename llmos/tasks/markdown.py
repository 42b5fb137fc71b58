"""The Markdown line grammar, written once: ingestion (tasks/ingest.py: blocks and heading paths for
search) and translation (tasks/translate.py: verbatim markup around translatable units) read Markdown
with these definitions of a fenced code block, a `#` heading and a list item, as CommonMark draws them.
"""

from __future__ import annotations

import re

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
# groups: the marker with its spaces, the title, an optional closing run of #, trailing blanks
HEADING = re.compile(r"^( {0,3}#{1,6}[ \t]+)(.*?)([ \t]+#+)?([ \t]*)$")
# groups: the indentation, marker and task box; the item's text
ITEM = re.compile(r"^([ \t]*(?:[-*+]|\d{1,9}[.)])[ \t]+(?:\[[ xX]\][ \t]+)?)(.*)$")


def fence_end(lines: list[str], i: int) -> int:
    """The index of the line that closes the code fence opened on `lines[i]` (the same character, at
    least as many times, nothing after it but blanks), or len(lines) when the fence never closes."""
    mark = FENCE.match(lines[i]).group(1)
    closing = re.compile(rf"^ {{0,3}}{re.escape(mark[0])}{{{len(mark)},}}\s*$")
    j = i + 1
    while j < len(lines) and not closing.match(lines[j]):
        j += 1
    return j


def heading(line: str) -> tuple[int, str] | None:
    """(level, title) of an ATX heading line, or None."""
    m = HEADING.match(line)
    return None if m is None else (m.group(1).count("#"), m.group(2))


def top_level_item(line: str) -> bool:
    """Whether the line starts a list item indented at most three spaces (not a nested one)."""
    m = ITEM.match(line)
    return m is not None and len(m.group(1)) - len(m.group(1).lstrip(" ")) <= 3 and not m.group(1).startswith("\t")
