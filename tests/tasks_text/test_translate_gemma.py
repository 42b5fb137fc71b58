"""The default translation model itself (Gemma 3 270M, as `auto` loads it): French that is French,
and Markdown structure and code byte-identical on the shared fixture."""

from __future__ import annotations

import pytest

from llmos.tasks.translate import translate

from test_text_translate import FENCE, FIXTURE, structure  # same folder


@pytest.fixture(scope="module")
def gemma(gemma3_path):
    import llmos

    return llmos.load(gemma3_path, quiet=True)


def test_translates_into_french(gemma):
    out = translate(gemma, "Where is the train station? The museum is closed on Mondays.", to="fr", source="en", beams=1)
    assert out.note is None  # nothing in the file says it lacks French
    assert "\n" not in out and {"est", "le"} & set(out.lower().replace("?", " ").split())
    assert any(word in out.lower() for word in ("gare", "musée", "lundi"))


def test_keeps_markdown_and_code(gemma):
    out = translate(gemma, FIXTURE, to="de", beams=1)
    assert structure(out) == structure(FIXTURE)
    assert FENCE.findall(out) == FENCE.findall(FIXTURE)
    assert out != FIXTURE
