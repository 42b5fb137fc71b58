"""Fixtures for the search and QA tests: the default embedding model and a small document folder
(plain text, Markdown, HTML and a PDF made here with fpdf2), indexed once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTES_TXT = """Operations notes
================

Rotating the API key
--------------------

To rotate the API key, run "acmectl keys rotate --project NAME". The old key keeps
working for 24 hours, so deployed services have time to pick up the new one.

Onboarding
----------

New engineers get a laptop on their first day and shadow the on-call engineer for a week.
"""

GUIDE_MD = """# Deployment guide

Everything about shipping the service.

## Database backups

Backups run nightly at 02:00 UTC and are kept for 35 days in the cold-storage bucket.

## Logging

Application logs are shipped to the central log cluster and kept for two weeks.
"""

OFFICE_HTML = """<!doctype html><html><head><title>Office</title>
<script>var tracking = "coffee machine descaled";</script></head>
<body><h1>Office information</h1>
<h2>Kitchen</h2><p>The coffee machine in the Lisbon office is
descaled every Tuesday by Marta.</p>
<h2>Parking</h2><p>Visitors park in the underground garage, level minus two.</p>
</body></html>
"""

REPORT_PAGES = [
    "Quarterly report\n\nRevenue in the third quarter grew 17 percent to 4.2 million euros, driven by the "
    "Nordic expansion.\n\nHeadcount stayed flat at 48 people.",
    "Outlook\n\nThe board expects the fourth quarter to be seasonally weaker.",
]

# query -> (file that answers it, a phrase of the passage that does)
QUERIES = {
    "how do I rotate the api key": ("notes.txt", "acmectl keys rotate"),
    "when do database backups run": ("guide.md", "Backups run nightly"),
    "who descales the coffee machine": ("office.html", "descaled every Tuesday"),
    "how much did revenue grow in the third quarter": ("report.pdf", "grew 17 percent"),
}


def write_pdf(path: Path, pages: list[str]) -> None:
    from fpdf import FPDF

    pdf = FPDF()
    pdf.set_font("Helvetica", size=12)
    for text in pages:
        pdf.add_page()
        pdf.multi_cell(0, 8, text)
    pdf.output(str(path))


def write_fixture_docs(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.txt").write_text(NOTES_TXT)
    (folder / "guide.md").write_text(GUIDE_MD)
    (folder / "office.html").write_text(OFFICE_HTML)
    write_pdf(folder / "report.pdf", REPORT_PAGES)
    return folder


@pytest.fixture(scope="session")
def embed_model_path() -> Path:
    from llmos import store

    return store.pull(store.DEFAULT_EMBED_MODEL, quiet=True)


@pytest.fixture(scope="session")
def embedder(embed_model_path):
    from llmos.tasks.embed import Embedder

    return Embedder.load(embed_model_path)


@pytest.fixture(scope="session")
def fixture_docs(tmp_path_factory) -> Path:
    return write_fixture_docs(tmp_path_factory.mktemp("docs"))


@pytest.fixture(scope="session")
def fixture_index(tmp_path_factory, fixture_docs, embedder):
    from llmos.tasks.index import Index

    index = Index(tmp_path_factory.mktemp("index") / "docs.sqlite", embedder)
    report = index.add([fixture_docs])
    assert sorted(Path(p).name for p in report.added) == ["guide.md", "notes.txt", "office.html", "report.pdf"]
    return index


@pytest.fixture(scope="session")
def queries() -> dict[str, tuple[str, str]]:
    return QUERIES
