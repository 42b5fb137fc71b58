"""A generation cut by its length limit in the middle of a multi-byte character ends without the
U+FFFD that the incomplete bytes would decode to: streamed, whole, beam and server output alike."""

from __future__ import annotations

import pytest

from llmos.tokenizer import IncrementalDecoder


@pytest.fixture(scope="module")
def emoji_start(fast_llm) -> int:
    """The first of the two byte-level tokens of 🙂: alone, an incomplete character."""
    ids = fast_llm.encode("🙂", add_special_tokens=False)
    assert len(ids) == 2 and fast_llm.decode(ids[:1]) == "\ufffd"
    return ids[0]


def test_the_decoder_drops_a_character_cut_at_the_end(fast_llm):
    ids = fast_llm.encode("请用中文介绍一下长城。🙂", add_special_tokens=False)
    decoder = IncrementalDecoder(fast_llm.tokenizer)
    text = "".join(decoder.push(i) for i in ids[:-1]) + decoder.flush()
    assert text == "请用中文介绍一下长城。"
    decoder = IncrementalDecoder(fast_llm.tokenizer)
    assert "".join(decoder.push(i) for i in ids) + decoder.flush() == "请用中文介绍一下长城。🙂"


@pytest.mark.parametrize("controls", [{"temperature": 0}, {"num_beams": 2}])
def test_a_length_cut_mid_character_gives_no_replacement_character(fast_llm, emoji_start, controls):
    force = {**controls, "max_new_tokens": 1, "logit_bias": {emoji_start: 100}}
    whole = fast_llm.generate("Hi", **force)
    assert whole.finish_reason == "length" and str(whole) == ""
    if "num_beams" not in controls:
        assert "".join(fast_llm.stream("Hi", **force)) == ""
