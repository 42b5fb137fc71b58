"""Documents in, chunks out: text extraction and chunking for the search index.

`extract(path) -> Document` reads plain text (.txt, .text, .rst), Markdown (.md, .markdown), HTML
(.html, .htm: visible text only) and PDF (.pdf, with pypdf), and files of any other name by their
content (a license file without a suffix is text; a zip or an image is not), into `Block`s: paragraphs, list items,
code blocks, each with the heading path above it ("Install > From source") and where it is. Headings
are Markdown's `#` and underlined titles (`Title` over `=====`), HTML's <h1>-<h6>; PDF blocks carry
their page instead.

`chunk(document, count_tokens, max_tokens) -> ChunkedDocument` packs consecutive blocks under the
same heading into chunks of at most `max_tokens` tokens, counted by the embedding model's own
tokenizer on exactly the text that will be embedded (`Chunk.embed_text`, heading path included). A
block too long for one chunk is split at sentence boundaries (then at words, if one sentence is too
long) and counted in `ChunkedDocument.split_blocks`: no chunk is ever truncated by the embedder.

Spans: `char_start`/`char_end` index `Document.text` and `line_start`/`line_end` (1-based,
inclusive) are lines of it. For text and Markdown, `Document.text` is the file's text, so lines are
the file's lines; for HTML, spans index the HTML source, so lines are the source's lines; for PDF,
`Document.text` is the extracted text of all pages and `page` says which page a chunk is on.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from llmos.errors import LlmosError
from llmos.tasks.markdown import FENCE, fence_end, top_level_item
from llmos.tasks.markdown import heading as atx_heading


@dataclass(frozen=True)
class Block:
    """A paragraph-sized unit of a document. `exact`: `text` is `Document.text[char_start:char_end]`."""

    text: str
    heading: tuple[str, ...]
    char_start: int
    char_end: int
    page: int | None = None
    exact: bool = True


@dataclass(frozen=True)
class Document:
    path: Path
    kind: str  # "text" | "markdown" | "html" | "pdf"
    text: str  # what the spans index: the file's text (the extracted text for PDF)
    blocks: list[Block]
    _line_starts: list[int] = field(default_factory=list, repr=False, compare=False)

    def line_of(self, offset: int) -> int:
        """1-based line number of a character offset into `text`."""
        if not self._line_starts:
            self._line_starts.extend([0] + [m.end() for m in re.finditer("\n", self.text)])
        return bisect.bisect_right(self._line_starts, offset)


@dataclass(frozen=True)
class Chunk:
    """One passage to embed and retrieve, with where it came from."""

    text: str
    heading: tuple[str, ...]
    char_start: int
    char_end: int
    line_start: int
    line_end: int
    page: int | None
    n_tokens: int  # of `embed_text`, special tokens included

    @property
    def embed_text(self) -> str:
        return embed_text(self.heading, self.text)


@dataclass(frozen=True)
class ChunkedDocument:
    document: Document
    chunks: list[Chunk]
    split_blocks: int  # blocks longer than one chunk, split at sentence or word boundaries


def embed_text(heading: tuple[str, ...], text: str) -> str:
    """What is embedded for a passage: its heading path, then its text."""
    return f"{' > '.join(heading)}\n{text}" if heading else text


# --- extraction -------------------------------------------------------------------------------------


def read_source(path: Path) -> str:
    return decode(path.read_bytes(), f"{path} looks like a binary file, not text")


def decode(data: bytes, binary_error: str) -> str:
    """Bytes as text: UTF-8 (BOM dropped), else cp1252; `binary_error` when they look binary."""
    if b"\0" in data[:8192]:
        raise LlmosError(binary_error)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")  # legacy Windows text is the common other case


_UNDERLINE = re.compile(r"^(=+|-+|\*+|~+|\^+|\"+|'+|\++|#+)[ \t]*$")


def split_lines(text: str, kind: str) -> list[Block]:
    """Blocks of plain text or Markdown: paragraphs split by blank lines, headings tracked.

    Both understand underlined titles; Markdown adds `#` headings, fenced code blocks kept whole,
    and list items as blocks of their own.
    """
    markdown = kind == "markdown"
    lines = text.splitlines(keepends=True)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))
    stack: list[tuple[int, str]] = []  # (level, title)
    underline_levels: dict[str, int] = {"=": 1, "-": 2} if markdown else {}
    blocks: list[Block] = []
    para: list[int] = []  # line indices of the paragraph being read

    def heading() -> tuple[str, ...]:
        return tuple(title for _, title in stack)

    def flush(upto: int | None = None) -> None:
        if para:
            start, end = starts[para[0]], starts[para[-1]] + len(lines[para[-1]].rstrip("\r\n"))
            if text[start:end].strip():
                blocks.append(Block(text[start:end], heading(), start, end))
            para.clear()

    def set_heading(level: int, title: str) -> None:
        while stack and stack[-1][0] >= level:
            stack.pop()
        stack.append((level, title.strip()))

    i = 0
    while i < len(lines):
        line = lines[i].rstrip("\r\n")
        if markdown and FENCE.match(line):
            flush()
            j = fence_end(lines, i)
            para.extend(range(i, min(j + 1, len(lines))))
            flush()
            i = j + 1
            continue
        atx = atx_heading(line) if markdown else None
        if atx:
            flush()
            set_heading(*atx)
        elif not line.strip():
            flush()
        elif (len(para) == 1 and _UNDERLINE.match(line) and len(line.strip()) >= max(3, len(lines[para[0]].strip()) // 2)
              and not top_level_item(lines[para[0]])):
            # "Title" over "=====": the one-line paragraph was a heading. Plain text numbers the
            # underline characters by first appearance, as reStructuredText does.
            char = line.strip()[0]
            level = underline_levels.setdefault(char, len(underline_levels) + 1)
            title = lines[para[0]].strip()
            para.clear()
            set_heading(level, title)
        else:
            if markdown and para and top_level_item(line):
                flush()
            para.append(i)
        i += 1
    flush()
    return blocks


class _HTMLText(HTMLParser):
    """Visible text of an HTML page as blocks, with heading paths and source spans."""

    SKIP = {"script", "style", "noscript", "template", "head", "svg", "math", "iframe", "object"}
    BLOCK = {"p", "div", "li", "ul", "ol", "dl", "dt", "dd", "table", "tr", "td", "th", "section", "article",
             "header", "footer", "nav", "aside", "main", "blockquote", "pre", "figure", "figcaption", "hr",
             "form", "fieldset", "address", "details", "summary", "body", "caption", "br"}
    HEADINGS = {"h1": 1, "h2": 2, "h3": 3, "h4": 4, "h5": 5, "h6": 6}

    def __init__(self, source: str) -> None:
        super().__init__(convert_charrefs=True)
        self._source = source
        self._line_starts = [0] + [m.end() for m in re.finditer("\n", source)]
        self._blocks: list[Block] = []
        self._stack: list[tuple[int, str]] = []
        self._parts: list[str] = []
        self._start: int | None = None
        self._skipping = 0
        self._pre = 0
        self._in_heading: int | None = None

    def _pos(self) -> int:
        line, col = self.getpos()
        return self._line_starts[line - 1] + col

    def flush(self) -> None:
        raw = "".join(self._parts)
        text = raw.strip() if self._pre else " ".join(raw.split())
        if text and self._start is not None:
            end = max(self._pos(), self._start + 1)
            if self._in_heading is not None:
                while self._stack and self._stack[-1][0] >= self._in_heading:
                    self._stack.pop()
                self._stack.append((self._in_heading, text))
            else:
                heading = tuple(t for _, t in self._stack)
                self._blocks.append(Block(text, heading, self._start, end, exact=False))
        self._parts.clear()
        self._start = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in self.SKIP:
            self._skipping += 1
        elif tag in self.HEADINGS:
            self.flush()
            self._in_heading = self.HEADINGS[tag]
        elif tag in self.BLOCK:
            self.flush()
            self._pre += tag == "pre"

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP:
            self._skipping = max(0, self._skipping - 1)
        elif tag in self.HEADINGS:
            self.flush()
            self._in_heading = None
        elif tag in self.BLOCK:
            self.flush()
            self._pre -= tag == "pre" and self._pre > 0

    def handle_data(self, data: str) -> None:
        if self._skipping or not data:
            return
        if self._start is None and data.strip():
            self._start = self._pos() + (len(data) - len(data.lstrip()))
        if self._start is not None:
            self._parts.append(data)


def read_plain(path: Path) -> Document:
    text = read_source(path)
    return Document(path, "text", text, split_lines(text, "text"))


def read_markdown(path: Path) -> Document:
    text = read_source(path)
    return Document(path, "markdown", text, split_lines(text, "markdown"))


def read_html(path: Path) -> Document:
    source = read_source(path)
    parser = _HTMLText(source)
    parser.feed(source)
    parser.close()
    parser.flush()
    return Document(path, "html", source, parser._blocks)


@contextlib.contextmanager
def _pypdf_quiet() -> Iterator[None]:
    """pypdf logs and warns about every repair it makes to a slightly broken file ("Ignoring wrong
    pointing object", "incorrect startxref pointer"); the text is read all the same, so the user's
    terminal is no place for them. Errors still raise."""
    logger = logging.getLogger("pypdf")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def read_pdf(path: Path) -> Document:
    try:
        from pypdf import PdfReader
        from pypdf.errors import PdfReadError
    except ImportError:
        raise LlmosError("reading PDF files needs pypdf, a dependency of llmos that is missing here: pip install pypdf") from None
    try:
        with _pypdf_quiet():
            reader = PdfReader(path)
            if reader.is_encrypted:
                raise LlmosError(f"{path} is an encrypted PDF; decrypt it first")
            pages = [page.extract_text() or "" for page in reader.pages]
    except (PdfReadError, ValueError, KeyError) as exc:
        if isinstance(exc, LlmosError):
            raise
        raise LlmosError(f"{path} is not a readable PDF ({exc})") from exc
    text, blocks = "", []
    for number, page_text in enumerate(pages, start=1):
        base = len(text)
        for block in split_lines(page_text, "text"):
            blocks.append(Block(block.text, (), base + block.char_start, base + block.char_end, page=number))
        text += page_text + "\n\n"
    return Document(path, "pdf", text, blocks)


# Suffix -> reader: the formats `extract` understands.
READERS: dict[str, Callable[[Path], Document]] = {
    ".txt": read_plain, ".text": read_plain, ".rst": read_plain,
    ".md": read_markdown, ".markdown": read_markdown,
    ".html": read_html, ".htm": read_html,
    ".pdf": read_pdf,
}


# Formats that are not text, recognised by their first bytes: zip (docx, pptx, odt, epub), ELF,
# images, compressed files, SQLite, GGUF.
_BINARY_MAGIC = (b"PK", b"\x7fELF", b"\x89PNG", b"GIF8", b"\xff\xd8\xff", b"\x1f\x8b", b"BZh", b"\xfd7zXZ",
                 b"SQLite format 3", b"GGUF", b"\xd0\xcf\x11\xe0")
_CONTROL = bytes(c for c in range(32) if c not in b"\t\n\r\f\x1b")


def sniff(path: Path) -> Callable[[Path], Document] | None:
    """The reader for a file whose name does not say its type (`Apache-2.0`, `README`, `notes.log`),
    from its first bytes: PDF and HTML by their markers, text when there is no NUL, few control
    characters and no known binary signature; None for anything else."""
    try:
        with open(path, "rb") as f:
            head = f.read(8192)
    except OSError:
        return None
    if head.startswith(b"%PDF-"):
        return read_pdf
    if head.startswith(_BINARY_MAGIC) or b"\0" in head or sum(head.count(c) for c in _CONTROL) > len(head) // 100:
        return None
    start = head.lstrip(b"\xef\xbb\xbf \t\r\n")[:15].lower()
    return read_html if start.startswith((b"<!doctype html", b"<html")) else read_plain


def reader_for(path: Path) -> Callable[[Path], Document] | None:
    """The reader for a file: by its suffix when llmos knows it, else by its content (sniff)."""
    return READERS.get(path.suffix.lower()) or sniff(path)


def supported(path: Path) -> bool:
    return reader_for(path) is not None


def extract(path: str | Path) -> Document:
    """Read one file into blocks; an LlmosError for a missing file or an unsupported type."""
    path = Path(path)
    if not path.is_file():
        raise LlmosError(f"no such file: {path}")
    reader = reader_for(path)
    if reader is None:
        raise LlmosError(f"{path}: unsupported file type {path.suffix or '(none)'} (not text by its content); "
                         f"llmos reads text files, {', '.join(sorted(READERS))}")
    return reader(path)


# --- chunking -----------------------------------------------------------------------------------------

_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+|\n+")


def chunk(document: Document, count_tokens: Callable[[str], int], max_tokens: int) -> ChunkedDocument:
    """Pack `document`'s blocks into chunks whose `embed_text` takes at most `max_tokens` tokens."""
    counts = {"split_blocks": 0}
    chunks = list(iter_chunks(document, count_tokens, max_tokens, counts))
    return ChunkedDocument(document, chunks, counts["split_blocks"])


def iter_chunks(document: Document, count_tokens: Callable[[str], int], max_tokens: int,
                counts: dict[str, int] | None = None) -> Iterator[Chunk]:
    """`chunk`'s chunks one at a time, as they are packed: a caller that embeds and stores them in
    batches holds a batch, never a whole large document's chunks. `counts["split_blocks"]` grows as
    oversized blocks are split."""
    if max_tokens < 8:
        raise LlmosError(f"max_tokens must be at least 8, got {max_tokens}")
    counts = counts if counts is not None else {}
    counts.setdefault("split_blocks", 0)

    def pieces() -> Iterator[Block]:
        for block in document.blocks:
            if count_tokens(embed_text(block.heading, block.text)) <= max_tokens:
                yield block
            else:
                counts["split_blocks"] += 1
                yield from _split_block(block, count_tokens, max_tokens)

    chunks: list[Chunk] = []  # what emit() made, handed out as soon as it is made
    group: list[Block] = []
    group_tokens = 0

    def joined(blocks: list[Block]) -> str:
        if all(b.exact for b in blocks):
            return document.text[blocks[0].char_start:blocks[-1].char_end]
        return "\n\n".join(b.text for b in blocks)

    def emit() -> None:
        if not group:
            return
        first, last = group[0], group[-1]
        text = joined(group)
        chunks.append(Chunk(
            text=text, heading=first.heading, char_start=first.char_start, char_end=last.char_end,
            line_start=document.line_of(first.char_start), line_end=document.line_of(max(last.char_end - 1, first.char_start)),
            page=first.page, n_tokens=group_tokens,
        ))
        group.clear()

    for block in pieces():
        if group and (block.heading != group[0].heading or block.page != group[0].page):
            emit()
        if group:
            tokens = count_tokens(embed_text(block.heading, joined([*group, block])))
            if tokens <= max_tokens:
                group.append(block)
                group_tokens = tokens
                continue
            emit()
        yield from chunks
        chunks.clear()
        group.append(block)
        group_tokens = count_tokens(embed_text(block.heading, block.text))
    emit()
    yield from chunks


def _split_block(block: Block, count_tokens: Callable[[str], int], max_tokens: int) -> list[Block]:
    """Cut an oversized block at sentence ends, or at words where a sentence alone is too long."""
    units: list[tuple[int, int]] = []  # (start, end) offsets into block.text
    pos = 0
    for m in _SENTENCE_END.finditer(block.text):
        if m.start() > pos:
            units.append((pos, m.start()))
        pos = m.end()
    if pos < len(block.text):
        units.append((pos, len(block.text)))
    fits = lambda s, e: count_tokens(embed_text(block.heading, block.text[s:e])) <= max_tokens  # noqa: E731
    spans: list[tuple[int, int]] = []
    for start, end in units:
        if spans and fits(spans[-1][0], end):
            spans[-1] = (spans[-1][0], end)
        elif fits(start, end):
            spans.append((start, end))
        else:
            spans.extend(_split_words(block.text, start, end, fits))
    out = []
    for s, e in spans:
        if block.exact:
            out.append(Block(block.text[s:e], block.heading, block.char_start + s, block.char_start + e, block.page))
        else:  # offsets of normalized text do not map back into the source: keep the block's span
            out.append(Block(block.text[s:e], block.heading, block.char_start, block.char_end, block.page, exact=False))
    return out


# A "word" as the word splitter sees one: a run of non-space of at most 1,000 characters. Longer runs
# (a minified line, "x.x.x..." for 300 KB) are cut into pieces first, so that no `fits` call measures
# more than a chunk plus one piece: measuring the whole run for every chunk cut from it was quadratic.
_WORD = re.compile(r"\S{1,1000}")


def _split_words(text: str, start: int, end: int, fits: Callable[[int, int], bool]) -> list[tuple[int, int]]:
    words = [(m.start(), m.end()) for m in _WORD.finditer(text[start:end])]
    spans: list[tuple[int, int]] = []
    i = 0
    while i < len(words):
        lo = start + words[i][0]
        # Grow the piece by doubling, then bisect back to the longest that fits.
        n, good = 1, 0
        while i + n <= len(words) and fits(lo, start + words[i + n - 1][1]):
            good, n = n, n * 2
        bad = min(n, len(words) - i + 1)
        while bad - good > 1:
            mid = (good + bad) // 2
            if fits(lo, start + words[i + mid - 1][1]):
                good = mid
            else:
                bad = mid
        if good == 0:  # one "word" longer than a chunk (a hash, a URL): cut it by characters, bisecting
            hi, bad = lo + 1, start + words[i][1] + 1  # at least one character, however many tokens it is
            while bad - hi > 1:
                mid = (hi + bad) // 2
                if fits(lo, mid):
                    hi = mid
                else:
                    bad = mid
            spans.append((lo, hi))
            words[i] = (hi - start, words[i][1])
            continue
        spans.append((lo, start + words[i + good - 1][1]))
        i += good
    return spans
