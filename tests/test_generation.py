"""Text-level generation on the default model: stop strings, streaming, logprobs, budgets, chat."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from llmos.errors import ContextLengthError, LlmosError
from llmos.generation import StopMatcher, fit_prompt, parse_controls, repetition_loop


# --- pure pieces --------------------------------------------------------------------------------

@pytest.mark.parametrize("pieces", [["Hel", "lo ST", "OP there"], ["Hello S", "T", "O", "P"], ["Hello STOP"]])
def test_stop_matcher_never_releases_a_split_stop_string(pieces):
    m = StopMatcher(["STOP"])
    out, stopped = "", False
    for p in pieces:
        text, stopped = m.feed(p)
        out += text
        assert "Hello ".startswith(out)  # nothing of the stop string is ever released, even in part
        if stopped:
            break
    assert stopped and out == "Hello " and m.text == "Hello "


def test_stop_matcher_releases_held_prefix_once_ruled_out():
    m = StopMatcher(["</end>"])
    assert m.feed("a </e") == ("a ", False)
    assert m.feed("xtra") == ("</extra", False)
    assert m.flush() == ""


def test_repetition_loop_detects_tail_loops_only():
    assert repetition_loop([1, 2, 3] * 20)
    assert repetition_loop(list(range(50)) + [7] * 48)
    assert not repetition_loop(list(range(100)))
    assert not repetition_loop([1, 2, 3] * 5)  # too short to call it a loop


# --- on the model -------------------------------------------------------------------------------

def test_stream_equals_generate_for_same_seed(fast_llm):
    kw = dict(max_new_tokens=40, seed=123, temperature=0.9)
    assert "".join(fast_llm.stream("My favourite food is", **kw)) == fast_llm.generate("My favourite food is", **kw)


def test_stop_string_spanning_tokens_never_appears(fast_llm):
    greedy = fast_llm.generate("The capital of France is", temperature=0, max_new_tokens=20)
    assert "Paris." in greedy  # " Paris" and "." are separate tokens
    stop = "ris."
    done = fast_llm.generate("The capital of France is", temperature=0, max_new_tokens=20, stop=[stop])
    streamed = "".join(fast_llm.stream("The capital of France is", temperature=0, max_new_tokens=20, stop=stop))
    assert stop not in done and stop not in streamed
    assert done == streamed == greedy[: greedy.index(stop)]
    assert done.finish_reason == "stop"


def test_chinese_and_emoji_stream_without_replacement_chars(fast_llm):
    pieces = list(fast_llm.stream("请用中文写一句话，加上表情符号😀：", max_new_tokens=40, seed=3))
    assert pieces and all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == fast_llm.generate("请用中文写一句话，加上表情符号😀：", max_new_tokens=40, seed=3)


def test_results_report_counts_and_finish_reasons(fast_llm):
    r = fast_llm.generate("Count: one, two,", max_new_tokens=5, temperature=0)
    assert r.finish_reason == "length" and r.completion_tokens == 5
    assert r.prompt_tokens == len(fast_llm.encode("Count: one, two,"))
    chat = fast_llm.chat([{"role": "user", "content": "Say hi."}], temperature=0)
    assert chat.finish_reason == "eos"


def test_n_choices_and_seed_reproducibility(fast_llm):
    a = fast_llm.generate("Once upon a time", n=3, max_new_tokens=12, seed=9)
    b = fast_llm.generate("Once upon a time", n=3, max_new_tokens=12, seed=9)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1
    assert a.completion_tokens == sum(len(c.token_ids) for c in a.choices)


def test_logprobs_are_the_models_own(llm):
    prompt = "The capital of France is"
    r = llm.generate(prompt, max_new_tokens=4, temperature=0, logprobs=3)
    ids = llm.encode(prompt)
    logits = llm.logits(ids + r.token_ids)
    for i, lp in enumerate(r.logprobs):
        row = logits[len(ids) - 1 + i].log_softmax(-1)
        assert lp.id == r.token_ids[i] and abs(lp.logprob - row[lp.id].item()) < 1e-4
        assert [t[1] for t in lp.top] == row.topk(3).indices.tolist()
        assert lp.top[0][1] == lp.id  # greedy took the most likely token


def test_logit_bias_and_repetition_guard(fast_llm):
    target = fast_llm.encode(" banana", add_special_tokens=False)[0]
    r = fast_llm.generate("I like", max_new_tokens=200, temperature=0, logit_bias={target: 100.0}, repetition_guard=True)
    assert r.finish_reason == "repetition" and r.completion_tokens < 200
    assert set(r.token_ids) == {target}


def test_no_silent_truncation(fast_llm):
    long_prompt = "word " * 9000  # more than the 8192-token context
    with pytest.raises(LlmosError) as err:
        fast_llm.generate(long_prompt, max_new_tokens=10)
    n = len(fast_llm.encode(long_prompt))
    assert str(n) in str(err.value) and "8192" in str(err.value)
    r = fast_llm.generate("Hello " * 30, max_new_tokens=5, temperature=0, truncate="left", max_length=None)
    assert r.truncated is None
    ids = fast_llm.encode("The end. " * 4200)
    left = fast_llm.start(ids, {"max_new_tokens": 100, "truncate": "left"})
    assert left.budget.truncated == {"side": "left", "removed_tokens": len(ids) + 100 - 8192}
    assert left.budget.ids == ids[-(8192 - 100):]
    right = fast_llm.start(ids, {"max_new_tokens": 100, "truncate": "right"})
    assert right.budget.ids == ids[: 8192 - 100]


@pytest.mark.parametrize("kwargs, name", [
    ({"temperature": -1}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_k": -2}, "top_k"), ({"min_p": 2}, "min_p"),
    ({"stop": [""]}, "stop"), ({"stop": ["x"] * 17}, "stop"), ({"n": 0}, "n"), ({"max_new_tokens": -1}, "max_new_tokens"),
    ({"frobnicate": 1}, "frobnicate"), ({"repetition_penalty": 0}, "repetition_penalty"),
])
def test_bad_arguments_name_the_argument(fast_llm, kwargs, name):
    with pytest.raises(ValueError, match=name):
        fast_llm.generate("Hi", **kwargs)


def test_chat_session_reuses_prefix_and_matches_fresh_chat(fast_llm):
    session = fast_llm.session()
    first = "".join(session.send("My name is Ana. Remember it.", temperature=0, max_new_tokens=24))
    first_ids = len(fast_llm.chat_ids(session.messages[:1]))
    assert session.last_prefilled == first_ids
    cached_before = list(session.cache_ids)
    second = "".join(session.send("What is my name?", temperature=0, max_new_tokens=24))
    full_ids = fast_llm.chat_ids(session.messages[:3])
    # Exactly the tokens after what the first turn left in the cache were read, and that covered
    # at least the whole first prompt.
    shared = next((i for i, (a, b) in enumerate(zip(cached_before, full_ids)) if a != b), min(len(cached_before), len(full_ids)))
    assert shared >= first_ids
    assert session.last_prefilled == len(full_ids) - shared
    assert session.last_prefilled < len(full_ids) - first_ids
    fresh = fast_llm.chat(session.messages[:3], temperature=0, max_new_tokens=24)
    assert second == fresh and first


def test_chat_cli_in_a_terminal(default_gguf_path, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    save = tmp_path / "chat.json"
    child = pexpect.spawn(sys.executable, ["-m", "llmos", "chat", "--model", default_gguf_path, "-t", "0", "-n", "300"],
                          encoding="utf-8", timeout=120)
    child.expect(">>> ")
    child.sendline("Hello! What is 2 + 2?")
    child.expect(">>> ")
    child.sendline("Write a very long story about a dragon.")
    child.expect("dragon\\.\r\n")  # the terminal's echo of the line
    child.expect(r"\w+ \w+ \w+")  # the reply has started streaming
    child.sendintr()
    child.expect(r"\[stopped\]")
    child.expect(">>> ")
    child.sendline(f"/save {save}")
    child.expect("saved 4 messages")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    messages = json.loads(save.read_text())
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[1]["content"] and messages[3]["content"]


@pytest.mark.parametrize("controls, param", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": -2}, "top_k"),
    ({"max_new_tokens": -1}, "max_new_tokens"), ({"n": 0}, "n"), ({"num_return_sequences": 500}, "n"),
    ({"stop": ["a", ""]}, "stop"), ({"logit_bias": {"x": 1.0}}, "logit_bias"), ({"logprobs": 99}, "logprobs"),
    ({"truncate": "middle"}, "truncate"), ({"n": 3, "num_beams": 2}, "n"),
])
def test_invalid_controls_name_the_argument(controls, param):
    """Errors carry the argument at fault (the server maps it to OpenAI's name) besides saying it."""
    with pytest.raises(LlmosError) as info:
        parse_controls(controls)
    assert info.value.param == param and param.split("_")[0] in str(info.value)


def test_context_overflow_carries_its_numbers():
    with pytest.raises(ContextLengthError) as info:
        fit_prompt(list(range(90)), parse_controls({"max_new_tokens": 20}), 100, 16)
    e = info.value
    assert (e.prompt_tokens, e.requested, e.context, e.param) == (90, 20, 100, "max_new_tokens")
    with pytest.raises(ContextLengthError) as info:
        fit_prompt(list(range(100)), parse_controls({}), 100, 16)  # nothing asked, no room left
    assert info.value.requested is None and info.value.param == "prompt"
