"""Grounded question answering: the pipeline's parts on fixtures with stand-in models where the model's
text does not matter (the support check, citation attachment, the fallback to a quoted sentence,
declining, loop stopping), and end to end with the real default models over the fixture documents."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from llmos.errors import LlmosError
from llmos.generation import Completion, Choice
from llmos.tasks import qa
from llmos.tasks.index import Index
from llmos.tasks.qa import NOT_STATED, NOTHING_FOUND, Answer, ask, clean


class NoModel:
    """Stands in for an LLM where the model must not be called."""

    def __getattr__(self, name):
        raise AssertionError(f"the chat model was used ({name}) although it should not be")


class Scripted:
    """A chat model that replies with a fixed text (and finish reason), recording what it was shown."""

    def __init__(self, reply: str, finish: str = "eos") -> None:
        self.reply, self.finish, self.seen = reply, finish, []

    def chat(self, messages, max_new_tokens, **controls):
        self.seen.append((messages, max_new_tokens, controls))
        return Completion([Choice(0, self.reply, [], self.finish, None)], prompt_tokens=10)


def test_a_supported_answer_is_kept_and_cited_by_the_pipeline(fixture_index):
    model = Scripted("The old key keeps working for 24 hours [7].")
    answer = ask(model, "How long does the old API key keep working after a rotation?", fixture_index)
    assert answer.found and not answer.extractive
    assert str(answer).startswith("The old key keeps working for 24 hours") and "[7]" not in answer
    assert answer.cited and answer.cited[0].path.endswith("notes.txt") and "24 hours" in answer.cited[0].quote
    assert f"[{answer.cited[0].number}]" in answer
    messages, max_new, controls = model.seen[0]
    assert controls["temperature"] == 0.0 and controls["repetition_guard"] and controls["stop"] == ["\n\n"]
    assert max_new == qa.DEFAULT_MAX_NEW_TOKENS
    assert "24 hours" in messages[-1]["content"]  # the evidence sentences, not whole passages
    assert "Onboarding" not in messages[-1]["content"] and "shadow the on-call" not in messages[-1]["content"]


@pytest.mark.parametrize("reply, finish", [
    ("The old key keeps working for 48 hours.", "eos"),  # a number the evidence does not hold
    ("It is managed by Kubernetes operators.", "eos"),  # a name the evidence does not hold
    ("The answer to your question is: the answer to your question is", "length"),  # ran to the cap
    ("Not stated.", "eos"),  # declined although the evidence is there
    ("How long does the old API key keep working?", "eos"),  # restates the question
    # supported, but a rewrite of the passage rather than an answer: more than MAX_ANSWER_WORDS new words
    ("To rotate the API key, run acmectl keys rotate; the old key keeps working for 24 hours, so deployed "
     "services have time to pick up the new one.", "eos"),
])
def test_an_unsupported_answer_falls_back_to_the_best_sentence(fixture_index, reply, finish):
    answer = ask(Scripted(reply, finish), "How long does the old API key keep working after a rotation?", fixture_index)
    assert answer.found and answer.extractive and answer.model_answer == clean(reply)
    assert "24 hours" in answer and answer.cited[0].path.endswith("notes.txt")
    assert str(answer) == f"\u201c{answer.cited[0].quote}\u201d [1]"


def test_extractive_answers_need_no_chat_model(fixture_index):
    answer = ask(NoModel(), "When do database backups run?", fixture_index, generate=False)
    assert "02:00 UTC" in answer and answer.cited[0].location.startswith(answer.cited[0].path + ":")
    assert answer.cited[0].path.endswith("guide.md") and answer.cited[0].heading[-1] == "Database backups"


def test_citation_lines_point_at_the_sentence(fixture_index, fixture_docs):
    answer = ask(NoModel(), "How long does the old API key keep working?", fixture_index, generate=False)
    source = answer.cited[0]
    lines = (fixture_docs / "notes.txt").read_text().splitlines()
    quoted = " ".join(lines[source.line_start - 1:source.line_end])
    assert "24 hours" in quoted and source.line_end - source.line_start <= 1


def test_empty_index_says_nothing_found(tmp_path):
    empty = Index(tmp_path / "empty.sqlite")
    answer = ask(NoModel(), "How do I rotate the API key?", empty)
    assert str(answer) == NOTHING_FOUND and not answer.found and answer.sources == [] and answer.cited == []
    stream = ask(NoModel(), "How do I rotate the API key?", empty, stream=True)
    assert "".join(stream) == NOTHING_FOUND and not stream.answer.found


def test_questions_the_documents_do_not_answer_are_declined(fixture_index):
    for question in ("What is the capital of France?", "Which programming language is the billing service written in?"):
        answer = ask(NoModel(), question, fixture_index)
        assert not answer.found and str(answer) in (NOTHING_FOUND, NOT_STATED), question
        assert answer.cited == []


def test_a_stricter_threshold_declines_and_shows_the_nearest(fixture_index):
    answer = ask(NoModel(), "When do database backups run?", fixture_index, min_support=10.0)
    assert not answer.found and str(answer) == NOT_STATED
    assert answer.nearest and "02:00" in answer.nearest[0].quote


def test_stream_yields_only_checked_text(fixture_index):
    stream = ask(Scripted("The old key keeps working for 48 hours."), "How long does the old API key keep working?",
                 fixture_index, stream=True)
    assert stream.sources and stream.sources[0].path.endswith("notes.txt")
    text = "".join(stream)
    assert "48" not in text and text == str(stream.answer) and stream.answer.extractive


def test_without_index_is_short_guarded_plain_chat():
    model = Scripted("4")
    answer = ask(model, "What is 2 + 2?")
    assert answer == "4" and answer.sources == [] and answer.found
    messages, max_new, controls = model.seen[0]
    assert messages == [{"role": "user", "content": "What is 2 + 2?"}]
    assert controls["temperature"] == 0.0 and controls["repetition_guard"] and max_new == qa.DEFAULT_MAX_NEW_TOKENS


def test_bad_arguments_are_one_line_errors(fixture_index):
    with pytest.raises(LlmosError, match="empty"):
        ask(NoModel(), "   ", fixture_index)
    with pytest.raises(LlmosError, match="evidence_sentences"):
        ask(NoModel(), "When do backups run?", fixture_index, evidence_sentences=0)


def test_clean_removes_model_citations_and_labels():
    assert clean("Answer: 24 hours [1][2, 3].\n") == "24 hours."
    assert clean("The answer is: nightly [9]") == "nightly"


def test_as_dict_is_json(fixture_index):
    answer = ask(NoModel(), "Who descales the coffee machine?", fixture_index, generate=False)
    data = json.loads(json.dumps(answer.as_dict()))
    assert data["found"] and data["cited"][0]["path"].endswith("office.html") and "Marta" in data["cited"][0]["quote"]


# --- the real default models ------------------------------------------------------------------------

def test_real_model_answers_are_right_short_and_cited(llm, fixture_index, queries):
    for question, (file, phrase), expected in [
        ("How long does the old API key keep working?", ("notes.txt", "24 hours"), r"24 hours"),
        ("Who descales the coffee machine?", ("office.html", "Marta"), r"Marta"),
        ("How much did revenue grow in the third quarter?", ("report.pdf", "17 percent"), r"17"),
    ]:
        answer = ask(llm, question, fixture_index)
        assert answer.found and expected in answer, (question, str(answer))
        assert answer.cited[0].path.endswith(file) and phrase in answer.cited[0].quote
        assert answer.finish_reason not in ("length", "repetition")
        assert len(str(answer)) < 400


def test_cli_ask_prints_the_answer_and_quoted_sources(fixture_index, tmp_path):
    run = subprocess.run([sys.executable, "-m", "llmos", "ask", "When do database backups run?",
                          "--index", str(fixture_index.path), "--extractive"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "02:00 UTC" in run.stdout and "Sources:" in run.stdout and "guide.md:" in run.stdout
    run = subprocess.run([sys.executable, "-m", "llmos", "ask", "When do database backups run?",
                          "--index", str(fixture_index.path), "--extractive", "--json"],
                         capture_output=True, text=True, timeout=300)
    data = json.loads(run.stdout)
    assert data["found"] and data["cited"][0]["quote"].startswith("Backups run nightly")


def test_eval_qa_scores_a_users_own_set(fixture_index, tmp_path):
    questions = tmp_path / "mine.jsonl"
    questions.write_text("\n".join(json.dumps(q) for q in [
        {"question": "When do database backups run?", "answers": [r"02:00"], "source": "guide.md"},
        {"question": "Who descales the coffee machine?", "answers": [r"\bMarta\b"], "source": "office.html"},
        {"question": "How long does the old API key keep working?", "answers": [r"48 hours"], "source": "notes.txt"},
        {"question": "What is the capital of France?", "answers": [], "source": None},
    ]) + "\n")
    out = tmp_path / "qa.json"
    run = subprocess.run([sys.executable, "-m", "llmos", "eval", "qa", str(questions), "--index", str(fixture_index.path),
                          "--extractive", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert re.search(r"correct +2 / 3", run.stdout) and re.search(r"declined \(unanswerable\) +1 / 1", run.stdout)
    summary = json.loads(out.read_text())[0]["summary"]
    assert summary["correct"] == summary["correct_cited"] == 2 and summary["looped"] == 0
    assert summary["unanswerable_declined"] == 1 and summary["declined"] == 0


def test_eval_qa_refuses_a_bad_set(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "Q?", "answers": ["(unclosed"], "source": "a.txt"}\n')
    run = subprocess.run([sys.executable, "-m", "llmos", "eval", "qa", str(bad), "--extractive"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "not a valid regex" in run.stderr and "Traceback" not in run.stderr


def test_an_answer_drawing_on_two_sentences_cites_both():
    from llmos.tasks.qa import Source, _standing_on

    def source(n, quote):
        return Source(n, f"/d/{n}.txt", f"/d/{n}.txt:{n}", (), quote, n, n, None, 1.0)

    sources = [source(1, "This Source Code Form is subject to the Mozilla Public License."),
               source(2, "Mozilla Foundation is the license steward."),
               source(3, "Weather is nice in the spring.")]
    used = _standing_on("The Mozilla Foundation, the license steward.", sources, "Who publishes the Mozilla Public License?")
    assert [s.number for s in used] == [2]
    used = _standing_on("It is under the Mozilla Public License; the Mozilla Foundation is its steward.", sources,
                        "Which license applies?")
    assert [s.number for s in used] == [1, 2]


def test_a_question_far_from_every_passage_still_shows_the_nearest(fixture_index):
    answer = ask(NoModel(), "What is the capital of France?", fixture_index, min_similarity=0.99)
    assert not answer.found and str(answer) == NOT_STATED and answer.nearest and not answer.cited


def test_cli_output_piped_into_a_reader_that_leaves_is_not_an_error(fixture_index):
    run = subprocess.run(f"{sys.executable} -m llmos search backups --index {fixture_index.path} -k 5 | head -c 10",
                         shell=True, capture_output=True, text=True, timeout=300)
    assert "Broken pipe" not in run.stderr and "Traceback" not in run.stderr


def test_eval_qa_keeps_one_copy_of_a_shipped_style_corpus(tmp_path, embedder):
    """A set NAME.jsonl with its documents in NAME/ beside it is indexed into the store's eval folder;
    a copy of the same documents indexed there from another place (another checkout) is removed, not
    retrieved twice."""
    import shutil
    import uuid

    from llmos import store
    from tests.tasks.conftest import write_fixture_docs

    name = f"llmostest-{uuid.uuid4().hex[:8]}"
    corpus = write_fixture_docs(tmp_path / name)
    (tmp_path / f"{name}.jsonl").write_text(json.dumps(
        {"question": "When do database backups run?", "answers": [r"02:00"], "source": "guide.md"}) + "\n")
    copy = shutil.copytree(corpus, tmp_path / "elsewhere" / name)
    path = store.home() / "eval" / f"qa-{name}.sqlite"
    try:
        with Index(path, embedder) as index:
            index.add([copy])
        run = subprocess.run([sys.executable, "-m", "llmos", "eval", "qa", str(tmp_path / f"{name}.jsonl"), "--extractive"],
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        with Index(path, embedder) as index:
            paths = [d.path for d in index.documents()]
        assert paths and all(p.startswith(str(corpus.resolve())) for p in paths)
        assert re.search(r"correct +1 / 1", run.stdout)
    finally:
        for p in path.parent.glob(f"qa-{name}.sqlite*"):
            p.unlink()
