"""Extraction (txt, md, html, pdf) and chunking: heading paths, spans, and no silent truncation."""

from __future__ import annotations

import pytest

from llmos.errors import LlmosError
from llmos.tasks.ingest import chunk, embed_text, extract


def test_markdown_headings_spans_and_fences(tmp_path):
    path = tmp_path / "a.md"
    path.write_text("# Guide\n\nIntro.\n\n## Install\n\nRun it.\nTwice.\n\n```sh\n# not a heading\nmake\n```\n\n"
                    "Setext\n------\n\nUnder it.\n")
    doc = extract(path)
    got = [(b.heading, b.text) for b in doc.blocks]
    assert got == [
        (("Guide",), "Intro."),
        (("Guide", "Install"), "Run it.\nTwice."),
        (("Guide", "Install"), "```sh\n# not a heading\nmake\n```"),
        (("Guide", "Setext"), "Under it."),
    ]
    for b in doc.blocks:  # spans index the file's text
        assert doc.text[b.char_start:b.char_end] == b.text
    run = doc.blocks[1]
    assert (doc.line_of(run.char_start), doc.line_of(run.char_end - 1)) == (7, 8)


def test_plain_text_underlined_titles(fixture_docs):
    doc = extract(fixture_docs / "notes.txt")
    assert doc.kind == "text"
    assert [b.heading for b in doc.blocks] == [("Operations notes", "Rotating the API key"), ("Operations notes", "Onboarding")]


def test_html_visible_text_with_source_lines(fixture_docs):
    doc = extract(fixture_docs / "office.html")
    texts = [b.text for b in doc.blocks]
    assert texts == ["The coffee machine in the Lisbon office is descaled every Tuesday by Marta.",
                     "Visitors park in the underground garage, level minus two."]
    assert all("tracking" not in t for t in texts)  # scripts are not text
    kitchen = doc.blocks[0]
    assert kitchen.heading == ("Office information", "Kitchen")
    assert (doc.line_of(kitchen.char_start), doc.line_of(kitchen.char_end - 1)) == (4, 5)  # lines of the HTML source


def test_pdf_pages(fixture_docs):
    doc = extract(fixture_docs / "report.pdf")
    assert doc.kind == "pdf"
    assert [b.page for b in doc.blocks] == [1, 2]
    assert "grew 17 percent" in doc.blocks[0].text and "fourth quarter" in doc.blocks[1].text


def test_oversized_paragraph_is_split_not_truncated(tmp_path, embedder):
    sentences = [f"Sentence number {i} talks about topic {i * 7} in some detail." for i in range(120)]
    path = tmp_path / "long.txt"
    run_on = " ".join(f"word{i}" for i in range(300))  # no sentence ends: split between words
    path.write_text("Title\n=====\n\n" + " ".join(sentences) + "\n\n" + run_on + "\n")
    limit = 64
    doc = chunk(extract(path), embedder.count_tokens, limit)
    assert doc.split_blocks == 2
    assert len(doc.chunks) > 10
    for c in doc.chunks:
        assert c.n_tokens == embedder.count_tokens(embed_text(c.heading, c.text)) <= limit
        assert c.heading == ("Title",)
    joined = " ".join(c.text for c in doc.chunks)
    assert all(s in joined for s in sentences)  # nothing was dropped
    assert " ".join(c.text for c in doc.chunks if c.text.startswith("word")) == run_on


def test_chunks_pack_paragraphs_under_one_heading(fixture_docs, embedder):
    doc = chunk(extract(fixture_docs / "guide.md"), embedder.count_tokens, 254)
    assert [c.heading for c in doc.chunks] == [("Deployment guide",), ("Deployment guide", "Database backups"),
                                               ("Deployment guide", "Logging")]
    assert doc.chunks[1].line_start == doc.chunks[1].line_end == 7


def test_unsupported_and_missing_files(tmp_path):
    (tmp_path / "x.docx").write_bytes(b"PK")
    with pytest.raises(LlmosError, match="unsupported file type"):
        extract(tmp_path / "x.docx")
    with pytest.raises(LlmosError, match="no such file"):
        extract(tmp_path / "missing.txt")
    (tmp_path / "bin.txt").write_bytes(b"\0\1\2")
    with pytest.raises(LlmosError, match="binary"):
        extract(tmp_path / "bin.txt")
    (tmp_path / "bad.pdf").write_bytes(b"not a pdf")
    with pytest.raises(LlmosError, match="PDF"):
        extract(tmp_path / "bad.pdf")


def test_ingestion_and_translation_read_code_fences_alike():
    """One Markdown grammar (tasks/markdown.py): a fence closes only on a run of its own character at
    least as long, so a `~~~` or a `# comment` inside a ``` block is code for both readers."""
    from llmos.tasks.ingest import split_lines
    from llmos.tasks.translate import parse_markdown

    text = "# Title\n\n```sh\n~~~\n# not a heading\n```\n\nAfter.\n"
    blocks = split_lines(text, "markdown")
    assert [b.text for b in blocks] == ["```sh\n~~~\n# not a heading\n```", "After."]
    assert all(b.heading == ("Title",) for b in blocks)
    parts = parse_markdown(text)
    assert "```sh\n~~~\n# not a heading\n```\n" in parts
