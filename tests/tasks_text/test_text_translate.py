"""Translation: languages and detection, the Markdown segmenter, and structure kept exactly (code
byte-identical) whatever the model writes: a tiny random model (noise, through beam search) and the
default model on a short fixture."""

from __future__ import annotations

import re

import pytest

from llmos.errors import LlmosError
from llmos.tasks import languages
from llmos.tasks.translate import Unit, acceptable, parse_markdown, translate

FIXTURE = """# Getting started

Install the package with `pip install llmos` and read the [guide](https://example.com/docs).

## Features

- Runs offline on your computer.
- Fast answers, see <https://example.com/speed>.
  1. Nested step with `code`.

> Keep it simple.

| Name | Meaning |
|------|---------|
| `load` | Opens a model. |

```python
def hello():
    # say hello, not "bonjour"
    print("Hello, world!")
```

    indented code stays too

Thanks for reading.
"""

FENCE = re.compile(r"^```.*?^```\n", re.M | re.S)


def structure(text: str) -> list[tuple]:
    """What must not change: each line's markup (not its words), code blocks, code spans, URLs."""
    out = []
    body = FENCE.sub("", text)
    for line in body.splitlines():
        if not line.strip():
            out.append(("blank",))
        elif m := re.match(r"^(#{1,6}) ", line):
            out.append(("heading", len(m.group(1))))
        elif m := re.match(r"^(\s*(?:[-*+]|\d+[.)]) )", line):
            out.append(("item", m.group(1)))
        elif line.startswith(">"):
            out.append(("quote",))
        elif line.startswith("|"):
            out.append(("row", line.count("|"), line if set(line) <= set("|-: ") else None))
        elif line.startswith("    "):
            out.append(("code", line))
        else:
            out.append(("text",))
    return [*out, ("fences", FENCE.findall(text)), ("spans", re.findall(r"`[^`\n]+`", body)),
            ("urls", re.findall(r"\]\(([^)]*)\)|<(https?://[^>]+)>", body))]


def test_language_names_and_codes():
    for name in ("fr", "FR", "French", "french", "français", "fra", "fr-CA", "fr_FR"):
        assert languages.resolve(name) == ("fr", "French")
    assert languages.resolve("Deutsch").code == "de"
    assert languages.resolve("pt-BR").code == "pt"
    assert languages.resolve("zh").name == "Chinese"


@pytest.mark.parametrize("bad", ["klingon", "xx", "", "en-", "12"])
def test_unknown_language_is_one_clear_line(bad):
    with pytest.raises(LlmosError) as info:
        languages.resolve(bad)
    message = str(info.value)
    assert "\n" not in message and "language" in message


@pytest.mark.parametrize("text, code", [
    ("Où est la gare ? Je cherche le train pour Paris.", "fr"),
    ("Wo ist der Bahnhof? Ich suche den Zug nach Berlin.", "de"),
    ("¿Dónde está la estación de tren? Busco el tren a Madrid.", "es"),
    ("Where is the train station? I am looking for the train to London.", "en"),
    ("Где находится вокзал?", "ru"),
])
def test_detects_the_source_language(text, code):
    assert languages.detect(text).code == code
    assert languages._heuristic(text).code == code  # the fallback without langdetect agrees here


def test_detection_needs_words():
    with pytest.raises(LlmosError, match="--from"):
        languages.detect("12 + 7 = 19")


def test_model_languages_from_files(default_gguf_path, tmp_path):
    class Fake:
        path = default_gguf_path

    assert languages.model_languages(Fake) == ("en",)  # GGUF general.languages
    note = languages.support_note(Fake, languages.resolve("en"), languages.resolve("fr"))
    assert "English (en) only" in note and "not trained to translate English to French" in note
    assert languages.support_note(Fake, languages.resolve("en"), languages.resolve("en")) is None
    card = tmp_path / "m"
    card.mkdir()
    (card / "README.md").write_text("---\nlicense: mit\nlanguage:\n- en\n- fr\n---\n# Model\n")
    Fake.path = card
    assert languages.model_languages(Fake) == ("en", "fr")
    (card / "README.md").write_text("# no front matter\n")
    assert languages.model_languages(Fake) is None


def test_segmenter_keeps_every_byte_of_markup():
    parts = parse_markdown(FIXTURE)
    units = [p.text for p in parts if isinstance(p, Unit)]
    assert units == [
        "Getting started",
        "Install the package with `pip install llmos` and read the [guide](https://example.com/docs).",
        "Features", "Runs offline on your computer.", "Fast answers, see <https://example.com/speed>.",
        "Nested step with `code`.", "Keep it simple.", "Name", "Meaning", "`load`", "Opens a model.",
        "Thanks for reading.",
    ]
    # Nothing but the units' text is translatable: joining everything back gives the input.
    assert "".join(p.text if isinstance(p, Unit) else p for p in parts) == FIXTURE
    wrapped = "A paragraph\nwrapped over\nthree lines.\n\n- an item\n  continued\n"
    assert [p.text for p in parse_markdown(wrapped) if isinstance(p, Unit)] == [
        "A paragraph wrapped over three lines.", "an item continued"]


def test_acceptable_answers_keep_structure():
    src = "Run `make test` and see [the docs](https://x.org)."
    assert acceptable(src, "Lancez `make test` et voyez [la doc](https://x.org).")
    assert not acceptable(src, "Lancez make test et voyez [la doc](https://x.org).")  # lost code span
    assert not acceptable(src, "Lancez `make test`\net voyez [la doc](https://x.org).")  # new line
    assert not acceptable("Hello", "# Bonjour")  # would become a heading
    assert not acceptable("Opens a model.", "Ouvre | un modèle.", cell=True)  # would split the cell
    assert not acceptable("Hello", "")


def test_structure_survives_a_random_model_with_beams(tiny_llm):
    out = translate(tiny_llm, FIXTURE, to="fr", source="en", beams=2)
    assert out != FIXTURE
    assert structure(out) == structure(FIXTURE)
    assert FENCE.findall(out) == FENCE.findall(FIXTURE)  # code blocks byte-identical
    assert out.count("\n") == FIXTURE.count("\n")
    assert out.segments >= 10 and out.source.code == "en" and out.target.code == "fr"


def test_long_paragraph_is_segmented_to_fit(tiny_llm, monkeypatch):
    sentence = "The quick brown fox jumps over the lazy dog near the `river` bank. "
    text = sentence * 20
    prompts = []
    real = tiny_llm.start

    def start(ids, controls, **kwargs):
        prompts.append(len(ids) + controls["max_new_tokens"])
        return real(ids, controls, **kwargs)

    monkeypatch.setattr(tiny_llm, "start", start)
    out = translate(tiny_llm, text, to="de", source="en", beams=1)
    assert len(prompts) >= 5 and max(prompts) <= tiny_llm.config.max_seq_len
    assert out.count("`river`") == 20


def test_same_language_and_code_only_are_returned_unchanged(tiny_llm):
    assert translate(tiny_llm, "Hello there, my friend.", to="en") == "Hello there, my friend."
    code = "```\nprint(1)\n```\n"
    assert translate(tiny_llm, code, to="fr") == code


def test_bad_arguments(tiny_llm):
    with pytest.raises(LlmosError, match="unknown language"):
        translate(tiny_llm, "Hello", to="elvish")
    with pytest.raises(LlmosError, match="empty"):
        translate(tiny_llm, " \n ", to="fr")
    with pytest.raises(LlmosError, match="beams"):
        translate(tiny_llm, "Hello", to="fr", beams=0)


def test_default_model_keeps_markdown_and_code(fast_llm):
    out = translate(fast_llm, FIXTURE, to="fr", beams=1)
    assert out.source.code == "en"  # detected
    assert structure(out) == structure(FIXTURE)
    assert FENCE.findall(out) == FENCE.findall(FIXTURE)
    assert "English (en) only" in out.note
