"""The parts of grounded answers and faithful summaries that need no chat model: sentence splitting with
locations, ranking, the support check, the loop guard on repeated sentences, and the summary check."""

from __future__ import annotations

import numpy as np

from llmos.generation import repeated_sentence
from llmos.tasks import evidence, faithful
from llmos.tasks.evidence import Sentence, key_terms, rank, sentences_of, split_sentences, supported
from llmos.tasks.index import SearchResult

LICENSE = """4. Redistribution. You may reproduce and distribute copies of the
Work, e.g. in Source form, provided that You meet the following conditions.
J. Smith wrote it. Termination takes effect after 30 days; after that the
license is gone for good and cannot come back.

- a list item that is long enough to count as one
- another item of the list, long enough as well

## Heading of a part
Text under the heading is here. And more text follows it here.
"""


def _spans(text):
    return [text[s:e] for s, e in split_sentences(text)]


def test_sentences_split_on_structure_and_punctuation_not_abbreviations():
    spans = _spans(LICENSE)
    assert spans[0].startswith("4. Redistribution. You may") and spans[0].endswith("conditions.")  # short head joined
    assert "e.g. in Source form" in spans[0]  # no cut after an abbreviation
    assert any(s.startswith("J. Smith wrote it. Termination") for s in spans)  # an initial is not an end
    assert "- a list item that is long enough to count as one" in spans
    assert "- another item of the list, long enough as well" in spans
    assert spans[-1] == "And more text follows it here."


def test_long_sentences_split_at_semicolons():
    clause = "the licensee shall keep every notice intact and unchanged in all copies"
    text = "; ".join([clause] * 8) + "."
    spans = _spans(text)
    assert len(spans) > 1 and all(len(s) <= evidence.MAX_SENTENCE_CHARS for s in spans)


def _result(text: str, line_start: int = 10, path: str = "/docs/apache-2.0.txt", page=None) -> SearchResult:
    return SearchResult(1, 1.0, 0.5, path, text, ("Terms",), line_start, line_start + text.count("\n"),
                        0, len(text), page, 7)


def test_sentence_locations_are_the_lines_of_the_file():
    sentences = sentences_of(_result(LICENSE), passage=2)
    first, termination = sentences[0], next(s for s in sentences if "30 days" in s.text)
    assert (first.line_start, first.line_end) == (10, 11)
    assert termination.line_start == 12 and termination.line_end == 13 and termination.passage == 2
    assert termination.location == "/docs/apache-2.0.txt:12-13" and termination.heading == ("Terms",)
    assert "\n" not in termination.text
    pdf = sentences_of(_result("A page sentence that is long enough here.", page=3), passage=0)
    assert pdf[0].location == "/docs/apache-2.0.txt p.3"


class BagOfWords:
    """An embedder over a fixed vocabulary: enough to rank by shared words, deterministic."""

    def __init__(self, texts):
        self.vocab = sorted({w for t in texts for w in evidence.content_words(t)})

    def _vec(self, text):
        words = set(evidence.content_words(text))
        v = np.array([1.0 if w in words else 0.0 for w in self.vocab] + [1e-3], dtype=np.float32)
        return v / np.linalg.norm(v)

    def embed(self, texts):
        return type("E", (), {"vectors": np.stack([self._vec(t) for t in texts])})()

    def embed_query(self, text):
        return self._vec(text)


def _sentence(text: str, passage: int = 0, path: str = "/d/a.txt") -> Sentence:
    return Sentence(text, path, (), 1, 1, None, passage, 0)


def test_rank_prefers_the_sentence_with_the_question_words_and_the_asked_kind():
    sentences = [_sentence("The license may be terminated by the licensor."),
                 _sentence("The license terminates 30 days after notice of the violation.", passage=3),
                 _sentence("Weather is nice in spring.")]
    ranked = rank("How many days after notice does the license terminate?", sentences,
                  BagOfWords([s.text for s in sentences] + ["days notice terminate"]))
    assert ranked[0].sentence.text.startswith("The license terminates 30 days")
    assert ranked[0].kind == 1.0 and ranked[-1].sentence.text.startswith("Weather")
    assert ranked[0].score > ranked[1].score > ranked[2].score


def test_rank_prefers_a_sentence_naming_an_exception_when_one_is_asked_for():
    sentences = [_sentence("Setting an attribute on a bound method is not possible."),
                 _sentence("Setting an attribute on a bound method raises AttributeError.", passage=2)]
    question = "Which exception results from setting an attribute on a bound method?"
    ranked = rank(question, sentences, BagOfWords([question]))  # both sentences equally similar
    assert ranked[0].sentence.text.endswith("raises AttributeError.") and ranked[0].kind == 1.0
    assert ranked[1].kind == 0.0  # the first passage's sentence, ahead without the kind
    # the same sentences for a question that asks for no exception: no kind bonus either way
    assert all(r.kind == 0.0 for r in rank("Can I set attributes on methods?", sentences, BagOfWords(["x"])))


def test_rank_prefers_the_document_the_question_names():
    same = "Licenses are reinstated if the violation ends within thirty days of notice."
    sentences = [_sentence(same, path="/d/gfdl-1.3.txt"), _sentence(same, path="/d/gpl-3.txt", passage=1)]
    ranked = rank("Under the GPL, when is a license reinstated?", sentences, BagOfWords([same, "gpl"]))
    assert ranked[0].sentence.path == "/d/gpl-3.txt" and ranked[0].named == 1.0


def test_support_check_needs_the_answers_numbers_names_and_new_words_in_the_evidence():
    evidence_ = ["The old key keeps working for 24 hours, says Marta from the Lisbon office."]
    assert supported("24 hours", evidence_, "How long does the old key work?")
    assert supported("It keeps working for 24 hours, according to Marta.", evidence_, "How long does the old key work?")
    assert not supported("48 hours", evidence_, "How long does the old key work?")
    assert not supported("Ask Pedro in Lisbon.", evidence_, "Who knows?")
    assert not supported("The old key works.", evidence_, "How long does the old key work?")  # nothing new
    assert not supported("It is renewed monthly by the security team.", evidence_, "How long?")
    assert key_terms('Use "acmectl keys" or `rotate` with Kubernetes 1.29 now.') == {"acmectl keys", "rotate", "kubernetes", "1.29"}


def test_the_loop_guard_stops_a_repeated_sentence_even_with_list_markers():
    assert repeated_sentence("The answer to your question is: yes.\nThe answer to your question is: yes.\n")
    assert repeated_sentence("(b) You are hereby permitted to use it. (c) You are hereby permitted to use it.")
    assert not repeated_sentence("A first sentence that is long enough. A second one, different from it.")
    assert not repeated_sentence("Short. Short.")  # too short to call it a loop


def test_summary_check_drops_unsupported_and_repeated_units_and_fills_from_the_source():
    source_text = ("The bridge opened in 1932 after six years of work. It carries eight lanes of traffic. "
                   "Ferries stopped running the same year. Tolls paid for its construction by 1950.")
    units = ["The bridge opened in 1932 after six years of work.",
             "The bridge opened in 1932 after six years of work!",  # a repeat
             "It was designed by Gustave Eiffel in 1901.",  # a name and a number the source lacks
             "It carries eight lanes of traffic."]
    embedder = BagOfWords([source_text] + units)
    source = faithful.SourceSentences.of(source_text, embedder)
    checked = faithful.check(units, source, embedder, words=40)
    assert checked.written == 4 and checked.repeated == 1 and checked.unsupported == 1 and checked.added >= 1
    assert "Eiffel" not in " ".join(checked.units)
    assert checked.units[:2] == [units[0], units[3]]
    assert all(u in source.sentences for u in checked.units[2:])


def test_extractive_baselines():
    sentences = ["The first sentence of the text is here.", "The second sentence of the text is here too.",
                 "A third one follows it in the text.", "The fourth is the last of all of them."]
    text = " ".join(sentences)
    assert faithful.lead(text, 3) == " ".join(sentences[:3])
    source = faithful.SourceSentences.of(text, BagOfWords([text]))
    summary = faithful.centroid(source, words=18)
    chosen = [s for s in sentences if s in summary]
    assert 1 <= len(chosen) <= 2 and summary == " ".join(chosen)  # whole sentences, in the text's order


def test_a_heading_stays_apart_from_the_sentence_after_it():
    text = "Quarterly report\n\nRevenue in the third quarter grew 17 percent to 4.2 million euros."
    assert _spans(text) == ["Quarterly report", "Revenue in the third quarter grew 17 percent to 4.2 million euros."]
    assert faithful.split_units("# Weekly notes\n\nThe team shipped the new search page on Monday.") == \
        ["The team shipped the new search page on Monday."]


def test_summary_check_drops_a_unit_whose_words_the_source_lacks():
    source_text = "Revenue in the third quarter grew 17 percent. The board expects the fourth quarter to be weaker."
    units = ["The report details the impact of the fourth quarter on customer churn and retention programmes."]
    embedder = BagOfWords([source_text] + units)
    checked = faithful.check(units, faithful.SourceSentences.of(source_text, embedder), embedder, words=30)
    assert checked.unsupported == 1 and units[0] not in checked.units
