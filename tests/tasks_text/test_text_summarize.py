"""Summarization: structure-aware chunks within budget, map-reduce over a document many times the
context (tiny random model: counts and budgets), one call for short text, styles, and a real
summary from the default model."""

from __future__ import annotations

import re

import pytest

from llmos.errors import LlmosError
from llmos.tasks import summarize as S

CONTEXT = 256  # the tiny model's (conftest.py)

PARAGRAPH = ("The committee met on day {i} and discussed the budget for project {i}. It agreed to repair the roads "
             "near school {i}, to plant trees in park {i} and to publish the minutes within a week.")


def long_document(sections: int = 24) -> str:
    parts = ["# Minutes of the committee"]
    for i in range(sections):
        parts.append(f"## Meeting {i}\n\n{PARAGRAPH.format(i=i)}\n\n- Item {i}a: roads\n- Item {i}b: parks")
    return "\n\n".join(parts)


class Spy:
    """Wraps llm.chat to record every prompt's length and token budget."""

    def __init__(self, llm, monkeypatch):
        self.calls: list[tuple[list[dict], int, int]] = []
        real = llm.chat

        def chat(messages, **controls):
            self.calls.append((messages, len(llm.chat_ids(messages)), controls["max_new_tokens"]))
            return real(messages, **controls)

        monkeypatch.setattr(llm, "chat", chat)


def test_chunks_follow_structure_and_fit(tiny_llm):
    doc = long_document()
    count = lambda s: len(tiny_llm.encode(s, add_special_tokens=False))  # noqa: E731
    chunks = S.split_chunks(doc, count, 120)
    assert len(chunks) > 5
    assert all(count(c) <= 120 for c in chunks)
    # Every paragraph and list item lands whole in exactly one chunk, in document order.
    units = [PARAGRAPH.format(i=i) for i in range(24)] + [f"- Item {i}a: roads" for i in range(24)]
    for unit in units:
        assert sum(unit in c for c in chunks) == 1, unit
    order = [next(k for k, c in enumerate(chunks) if PARAGRAPH.format(i=i) in c) for i in range(24)]
    assert order == sorted(order)
    # Each chunk says where it is: the heading path of its first block.
    assert all(c.startswith("## ") for c in chunks)
    assert "## Minutes of the committee > Meeting 3" in "".join(chunks)


def made_from(content: str, kind: str, words: int | None = None) -> bool:
    """Whether a prompt is S.PROMPTS[kind] filled in (with `words` when given): tests follow the
    templates, not their wording."""
    pattern = re.escape(S.PROMPTS[kind]).replace(re.escape("{text}"), ".*")
    pattern = pattern.replace(re.escape("{words}"), str(words) if words is not None else r"\d+")
    return re.fullmatch(pattern, content, re.S) is not None


def test_document_five_times_the_context_is_map_reduced(tiny_llm, monkeypatch, capsys):
    doc = long_document()
    assert tiny_llm.config.max_seq_len == CONTEXT
    tokens = len(tiny_llm.encode(doc))
    assert tokens >= 5 * CONTEXT
    spy = Spy(tiny_llm, monkeypatch)
    summary = S.summarize(tiny_llm, doc, words=30, progress=True, max_new_tokens=16)
    assert summary.strip()
    assert summary.input_tokens >= 5 * CONTEXT
    levels = summary.levels
    assert len(levels) >= 2, "16-token summaries of this many chunks do not fit one prompt: a second level"
    assert levels[0] >= 5 and levels[1] < levels[0]
    assert summary.calls == len(spy.calls) == sum(levels) + 1
    # Every prompt, with its answer budget, fits the context.
    assert all(n + new <= CONTEXT for _, n, new in spy.calls)
    assert summary.max_prompt_tokens == max(n for _, n, _ in spy.calls)
    # The first level read the whole document, in order, chunk by chunk.
    first = [m[1]["content"] for m, _, _ in spy.calls[: levels[0]]]
    for i in range(24):
        assert sum(PARAGRAPH.format(i=i) in p for p in first) == 1
    assert all(S.SYSTEM == m[0]["content"] for m, _, _ in spy.calls)
    assert all(made_from(m[1]["content"], "part") for m, _, _ in spy.calls[:levels[0]])
    assert made_from(spy.calls[levels[0]][0][1]["content"], "combine")  # level 2 combines summaries
    assert made_from(spy.calls[-1][0][1]["content"], "final-paragraph", words=30)
    err = capsys.readouterr().err
    # One progress bar per level, over its chunks.
    assert f"summarizing (level 1):   0%|          | 0/{levels[0]}" in err
    assert f"summarizing (level 2):   0%|          | 0/{levels[1]}" in err


def test_short_text_goes_through_one_call(tiny_llm, monkeypatch):
    spy = Spy(tiny_llm, monkeypatch)
    summary = S.summarize(tiny_llm, PARAGRAPH.format(i=1), words=20, progress=False)
    assert summary.levels == () and summary.calls == 1 == len(spy.calls)
    assert made_from(spy.calls[0][0][1]["content"], "paragraph", words=20)


def test_prompts_forbid_new_facts():
    assert "Never add facts" in S.SYSTEM
    for kind, prompt in S.PROMPTS.items():
        assert "only" in prompt, kind


def test_styles_and_length_are_enforced():
    para = "Here is a summary:\nThe council voted. It approved the lane. It added parking."
    assert S.tidy(para, "bullets", 50) == "- The council voted.\n- It approved the lane.\n- It added parking."
    assert S.tidy("* one\n2. two\n- three", "paragraph", 50) == "one two three"
    assert S.tidy("It rained. The text is long. The text  is long. The text is long.", "paragraph", 50) == \
        "It rained. The text is long."
    assert S.tidy("It rained. The roads were", "paragraph", 50) == "It rained."  # a cut-off sentence goes
    long = " ".join(f"Sentence number {i} is here." for i in range(40))
    trimmed = S.tidy(long, "paragraph", 20)
    assert len(trimmed.split()) <= 20 and trimmed.endswith(".")
    bullets = S.tidy("\n".join(f"- point {i} has five words" for i in range(20)), "bullets", 20)
    assert len(bullets.split("\n")) == 4


@pytest.mark.parametrize("kwargs, message", [
    ({"text": "   \n"}, "empty"),
    ({"words": 0}, "words must be"),
    ({"style": "poem"}, "style must be"),
])
def test_bad_arguments(tiny_llm, kwargs, message):
    args = {"text": "Some text.", **kwargs}
    with pytest.raises(LlmosError, match=message):
        S.summarize(tiny_llm, args.pop("text"), progress=False, **args)


FIXTURE = """# Harlow Bay council votes for a bike lane

The city council of Harlow Bay voted seven to two on Tuesday to build a protected bicycle lane on Main Street,
from the train station to the university. The project will cost 1.2 million dollars, mostly paid by a state
grant. Shop owners worried about losing forty parking spaces, so the council will build a car park with sixty
spaces behind the library. Construction starts in March.
"""


def test_default_model_writes_a_faithful_summary(fast_llm):
    summary = S.summarize(fast_llm, FIXTURE, words=40, progress=False)
    assert summary.levels == () and summary.calls == 1
    words = summary.split()
    assert 5 <= len(words) <= 48
    assert "\n" not in summary
    source = FIXTURE.lower()
    # It is about the text: most of its content words come from it, and so do all its numbers.
    content = [w for w in re.findall(r"[a-z]{5,}", summary.lower())]
    assert sum(w in source for w in content) >= 0.7 * len(content)
    assert all(n in FIXTURE for n in re.findall(r"\d+(?:\.\d+)?", summary))
