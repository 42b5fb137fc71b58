"""Translation by a model without a chat template (a base model such as Gemma 3 270M, the default
translation model): the one-shot prompt in the pair's languages, newline-bounded answers, structure kept
whatever the model writes; the default model choice and the one-line error when it is not pulled.
The real model is exercised on the shipped set by `llmos eval translate` (README) and in
test_translate_gemma.py."""

from __future__ import annotations

import pytest

from llmos.errors import LlmosError
from llmos.tasks import languages
from llmos.tasks.translate import DEFAULT_MODEL, ONE_SHOT, plain_prompt, translate

from test_text_translate import FENCE, FIXTURE, structure  # same folder


def test_one_shot_prompt_in_the_pairs_languages():
    en, fr, sw = languages.resolve("en"), languages.resolve("fr"), languages.resolve("sw")
    prompt = plain_prompt("Where is the train station?", en, fr)
    assert prompt == (f"English: {ONE_SHOT['en']}\nFrench: {ONE_SHOT['fr']}\n\n"
                      "English: Where is the train station?\nFrench:")
    assert plain_prompt("Hello", en, sw) == "English: Hello\nSwahili:"  # no example in Swahili: zero-shot


@pytest.fixture
def base_llm(tiny_llm, monkeypatch):
    """The tiny model as a base model: no chat template."""
    monkeypatch.setattr(tiny_llm.tokenizer, "chat_template", None)
    return tiny_llm


def test_a_model_without_template_gets_the_plain_prompt_and_keeps_structure(base_llm, monkeypatch):
    sent = []
    real = base_llm.start

    def start(ids, controls, **kwargs):
        sent.append((ids, controls))
        return real(ids, controls, **kwargs)

    monkeypatch.setattr(base_llm, "start", start)
    out = translate(base_llm, "Thanks for reading.", to="fr", source="en", beams=2)
    ids, controls = sent[0]
    assert ids == base_llm.encode(plain_prompt("Thanks for reading.", languages.resolve("en"), languages.resolve("fr")))
    sent.clear()  # a document is text: a special token spelled in it is not the special id
    special = next(t for t in ("<|im_end|>", "<|endoftext|>", "</s>") if base_llm.tokenizer.token_to_id(t) is not None)
    translate(base_llm, f"Stop here {special} please.", to="fr", source="en", beams=1)
    assert base_llm.tokenizer.token_to_id(special) not in sent[0][0]
    assert controls["stop"] == ["\n"] and controls["num_beams"] == 2
    assert "\n" not in out
    out = translate(base_llm, FIXTURE, to="fr", source="en", beams=2)
    assert structure(out) == structure(FIXTURE)
    assert FENCE.findall(out) == FENCE.findall(FIXTURE)


def test_the_default_chat_model_hands_translation_to_the_translation_model(fast_llm, monkeypatch):
    from llmos import api

    asked = []

    def fake(name, dtype):
        asked.append(name)
        raise LlmosError(f"model {name!r} is not pulled yet: run `llmos pull {name}`")

    monkeypatch.setattr(api, "_load_translator", fake)
    with pytest.raises(LlmosError, match="llmos pull gemma3-270m"):
        fast_llm.translate("Hello, my friend.", to="fr")
    assert asked == [DEFAULT_MODEL]
    assert fast_llm.translate("Hello, my friend.", to="fr", model=fast_llm, beams=1)  # asked for: itself


def test_cli_says_to_pull_the_translation_model(tmp_path, monkeypatch, capsys):
    from llmos.cli.main import main

    monkeypatch.setenv("LLMOS_HOME", str(tmp_path / "empty"))
    code = main(["translate", "--to", "fr", "Where is the train station?"])
    err = capsys.readouterr().err
    assert code != 0 and "llmos pull gemma3-270m" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "empty" / "models" / "gemma3-270m").exists()  # nothing downloaded unasked
