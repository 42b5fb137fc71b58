"""Question answering over the fixture index with the real default chat model, the nothing-found
path (the model is never called), plain chat without an index, packing and citation parsing."""

from __future__ import annotations

import pytest

from llmos.errors import LlmosError
from llmos.tasks.index import Index
from llmos.tasks.qa import NOTHING_FOUND, Answer, Source, ask, build_messages, cite, pack


class NoModel:
    """Stands in for an LLM where the model must not be called."""

    def __getattr__(self, name):
        raise AssertionError(f"the chat model was used ({name}) although nothing was retrieved")


def test_ask_cites_the_passage_with_the_answer(llm, fixture_index):
    answer = ask(llm, "How do I rotate the API key?", fixture_index, k=2, max_new_tokens=32)
    assert isinstance(answer, Answer) and answer.found and answer.strip()
    assert answer.sources[0].path.endswith("notes.txt")
    assert answer.cited, f"no citation in {answer!r}"
    assert any("acmectl keys rotate" in s.text for s in answer.cited)
    assert all(s.location.startswith(s.path) for s in answer.cited)


def test_ask_streams(llm, fixture_index):
    stream = ask(llm, "Who descales the coffee machine?", fixture_index, k=1, stream=True, max_new_tokens=8)
    assert stream.sources and stream.sources[0].path.endswith("office.html")
    pieces = list(stream)
    assert pieces and stream.answer == "".join(pieces)


def test_empty_index_says_nothing_found(tmp_path):
    empty = Index(tmp_path / "empty.sqlite")
    answer = ask(NoModel(), "How do I rotate the API key?", empty)
    assert str(answer) == NOTHING_FOUND and not answer.found and answer.sources == [] and answer.cited == []
    stream = ask(NoModel(), "How do I rotate the API key?", empty, stream=True)
    assert "".join(stream) == NOTHING_FOUND


def test_irrelevant_question_says_nothing_found(fixture_index):
    answer = ask(NoModel(), "What is the capital of France?", fixture_index)
    assert not answer.found and str(answer) == NOTHING_FOUND


def test_without_index_is_plain_chat():
    class Chat:
        def chat(self, messages, max_new_tokens, **controls):
            assert messages == [{"role": "user", "content": "What is 2 + 2?"}]
            assert controls["temperature"] == 0.0  # greedy unless asked otherwise
            return "4"

    answer = ask(Chat(), "What is 2 + 2?")
    assert answer == "4" and answer.sources == [] and answer.found


def test_pack_stays_within_the_budget(llm, fixture_index):
    question = "how much did revenue grow in the third quarter"
    results = fixture_index.search(question, k=4)
    everything = pack(llm, question, results, budget=10_000)
    assert len(everything) == len(results)
    one_less = len(_prompt_ids(llm, question, everything)) - 1
    fewer = pack(llm, question, results, budget=one_less)
    assert 0 < len(fewer) < len(everything)
    assert len(_prompt_ids(llm, question, fewer)) <= one_less
    assert [s.number for s in fewer] == list(range(1, len(fewer) + 1))
    with pytest.raises(LlmosError):
        pack(llm, question, results, budget=10)


def _prompt_ids(llm, question, sources):
    text = llm.tokenizer.apply_chat_template(build_messages(question, sources), add_generation_prompt=True)
    return llm.encode(text, add_special_tokens=False)


def _source(n: int, text: str) -> Source:
    return Source(n, f"/d/{n}.md", f"/d/{n}.md:1", (), text, 1, 1, None, 1.0, 0.5)


def test_citation_parsing():
    sources = [_source(1, "alpha beta gamma"), _source(2, "delta epsilon zeta"), _source(3, "eta theta")]
    assert cite("See [2] and [1, 3]; also [9].", sources) == ([sources[1], sources[0], sources[2]], False)
    # No [n] at all: the source sharing the most words is cited, marked as inferred.
    assert cite("It is delta epsilon zeta indeed.", sources) == ([sources[1]], True)
    assert cite("Nothing in common here.", sources) == ([], False)
