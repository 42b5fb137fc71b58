"""Summaries from a model without a chat template (a base model such as Gemma 3 270M): plain prompts
ending in "Summary:" (or "Key points:" and a first "- "), answers bounded by a blank line; the map-reduce
path and the style are the same as for chat models. `llmos summarize --model gemma3-270m` runs this."""

from __future__ import annotations

import pytest

from llmos.tasks.summarize import summarize


@pytest.fixture
def base_llm(tiny_llm, monkeypatch):
    monkeypatch.setattr(tiny_llm.tokenizer, "chat_template", None)
    return tiny_llm


def test_plain_prompts_for_a_base_model(base_llm, monkeypatch):
    sent = []
    real = base_llm.start

    def start(ids, controls, **kwargs):
        sent.append((base_llm.decode(ids), controls))
        return real(ids, controls, **kwargs)

    monkeypatch.setattr(base_llm, "start", start)
    text = "The council approved the library plan on Tuesday. Work starts in March and takes eighteen months."
    out = summarize(base_llm, text, words=30, check=False, progress=False)
    prompt, controls = sent[0]
    assert prompt.rstrip().endswith("Summary:") and text in prompt and "<|im_start|>" not in prompt
    assert controls["stop"] == ["\n\n"] and controls["temperature"] == 0
    assert isinstance(out, str) and "\n" not in out
    bullets = summarize(base_llm, text, words=30, style="bullets", check=False, progress=False)
    assert sent[-1][0].endswith("Key points:\n- ")
    assert all(line.startswith("- ") for line in bullets.splitlines())


def test_a_special_token_spelled_in_the_document_stays_text(base_llm, monkeypatch):
    sent = []
    real = base_llm.start

    def start(ids, controls, **kwargs):
        sent.append(ids)
        return real(ids, controls, **kwargs)

    monkeypatch.setattr(base_llm, "start", start)
    special = next(t for t in ("<|im_end|>", "<|endoftext|>", "</s>") if base_llm.tokenizer.token_to_id(t) is not None)
    summarize(base_llm, f"The plan was approved. {special} Work starts in March.", words=20, check=False, progress=False)
    assert base_llm.tokenizer.token_to_id(special) not in sent[0]


def test_a_long_text_is_mapped_and_reduced_with_plain_prompts(base_llm):
    text = " ".join(f"Sentence number {i} says something about topic {i % 7}." for i in range(300))
    out = summarize(base_llm, text, words=40, check=False, progress=False)
    assert out.levels and out.calls > 1
