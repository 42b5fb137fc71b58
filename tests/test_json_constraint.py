"""The JSON automaton and the constrained-decoding processor, without a server or a model."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmos.engine.sampling import SamplingParams, process
from llmos.json_constraint import (
    ANY, OBJECT, JsonConstraint, TokenTexts, check_output, complete, compile_schema, feed_text, start,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10 ** 12, 10 ** 12) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


def accepts(node, text: str) -> bool:
    state = feed_text(start(node), text)
    return state is not None and complete(state)


@settings(max_examples=150, deadline=None)
@given(json_values, st.sampled_from([None, 2]), st.booleans())
def test_every_json_value_is_accepted_and_only_complete_at_its_end(value, indent, ascii_only):
    text = json.dumps(value, indent=indent, ensure_ascii=ascii_only)
    assert accepts(ANY, text)
    if isinstance(value, (dict, list, str)):  # a container or string is incomplete before its last character
        for cut in range(len(text)):
            state = feed_text(start(ANY), text[:cut])
            assert state is not None and not complete(state)
    if isinstance(value, dict):
        assert accepts(OBJECT, text)
    else:
        assert not accepts(OBJECT, text)


@pytest.mark.parametrize("text", ['{"a":01}', '{"a":1,}', '[1,]', '{"a" 1}', '{a:1}', '{"a":1}}', "{'a':1}", '["\x01"]',
                                  '{"a":tru}', '{"a":-}', '{"a":1.}', '{"a":"\\x"}', '{"a":1,"a":2}', '[1] [2]', "NaN"])
def test_invalid_json_is_refused(text):
    assert not accepts(ANY, text)


PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"},
                         "tags": {"type": "array", "items": {"enum": ["a", "b", 3]}, "maxItems": 2},
                         "pet": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/Pet"}]}},
          "$defs": {"Pet": {"type": "object", "properties": {"kind": {"const": "cat"}, "friend": {"$ref": "#/$defs/Pet"}},
                            "additionalProperties": False}}}


@pytest.mark.parametrize("text, ok", [
    ('{"name": "Bo", "age": 3}', True),
    ('{"age": -3, "tags": ["a", 3], "name": "Bo"}', True),
    ('{"name": "Bo", "age": 3, "pet": {"kind": "cat", "friend": {"friend": {}}}}', True),
    ('{"name": "Bo", "age": 3, "pet": null}', True),
    ('{"name": "Bo"}', False),                                # required key missing
    ('{"name": "Bo", "age": 3.5}', False),                    # integer
    ('{"name": "Bo", "age": 3, "x": 1}', False),              # additional property
    ('{"name": "Bo", "age": 3, "tags": ["c"]}', False),       # enum
    ('{"name": "Bo", "age": 3, "tags": ["a", "b", 3]}', False),  # maxItems
    ('{"name": "Bobbybobby", "age": 3}', False),              # maxLength
    ('{"name": "Bo", "age": 3, "pet": {"kind": "dog"}}', False),  # const through $ref
    ('{"name": 5, "age": 3}', False),
])
def test_schema_structure_is_enforced(text, ok):
    node = compile_schema(PERSON)
    assert accepts(node, text) is ok
    if ok:
        jsonschema.validate(json.loads(text), PERSON)
        assert check_output(text, PERSON) is None


@pytest.fixture(scope="module")
def texts(default_model_name):
    from llmos.api import load_tokenizer

    return TokenTexts(load_tokenizer(default_model_name))


def decode_with_random_logits(texts, node, seed: int, steps: int) -> tuple[str, bool]:
    """Drive the processor as the engine does, with random logits standing in for a model."""
    tok = texts.tokenizer
    gen = torch.Generator().manual_seed(seed)
    prompt = [1, 2, 3]
    c = JsonConstraint(texts, node, len(prompt), tok.stop_ids)
    ids = list(prompt)
    for _ in range(steps):
        logits = torch.randn(1, tok.vocab_size, generator=gen) * 3
        out = process(logits, SamplingParams(top_p=0.9), masks=[c], ids=torch.tensor([ids]))[0]
        allowed = torch.isfinite(out).nonzero()[:, 0]
        token = int(allowed[torch.multinomial(out[allowed].softmax(-1), 1, generator=gen)])
        if token in tok.stop_ids:
            return tok.decode(ids[len(prompt):], skip_special_tokens=True), True
        ids.append(token)
    return tok.decode(ids[len(prompt):], skip_special_tokens=True), False


@pytest.mark.parametrize("seed", range(3))
def test_processor_yields_schema_valid_json_from_noise(texts, seed):
    schema = {"type": "object", "additionalProperties": False, "required": ["ok", "n", "tags"],
              "properties": {"ok": {"type": "boolean"}, "n": {"type": "number"},
                             "tags": {"type": "array", "maxItems": 2, "items": {"type": "string", "maxLength": 6}}}}
    text, ended = decode_with_random_logits(texts, compile_schema(schema), seed, steps=400)
    assert ended, text
    jsonschema.validate(json.loads(text), schema)


def test_processor_keeps_a_valid_prefix_and_ends_only_when_complete(texts):
    text, ended = decode_with_random_logits(texts, OBJECT, 0, steps=40)
    state = feed_text(start(OBJECT), text)
    assert state is not None
    if ended:
        assert isinstance(json.loads(text), dict)


# --- the engine's mask hook and the library feature ----------------------------------------------


def test_masks_run_between_the_penalties_and_the_warpers():
    """top_k=1 after a mask that bans the top token keeps the best allowed one (a mask after the
    warpers would leave nothing); penalties see the logits before the mask."""
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0]])
    seen = []

    def ban_first(lg, ids):
        seen.append(lg.clone())
        return lg.index_fill(-1, torch.tensor([0]), float("-inf"))

    out = process(logits, SamplingParams(top_k=1, logit_bias={3: 10.0}), masks=[ban_first], ids=torch.tensor([[0]]))
    assert seen[0][0, 3] == 12.0  # the bias ran first
    assert torch.isfinite(out[0]).tolist() == [False, False, False, True]
    out = process(logits, SamplingParams(top_k=1), masks=[ban_first], ids=torch.tensor([[0]]))
    assert torch.isfinite(out[0]).tolist() == [False, True, False, False]


SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "country"],
          "properties": {"city": {"type": "string", "maxLength": 20}, "country": {"type": "string", "maxLength": 20}}}


def test_generate_and_chat_take_a_response_format(fast_llm):
    rf = {"type": "json_schema", "json_schema": {"name": "place", "schema": SCHEMA}}
    out = fast_llm.chat([{"role": "user", "content": "Where is the Eiffel Tower? Answer in JSON."}],
                        response_format=rf, temperature=0, max_new_tokens=60)
    assert out.finish_reason == "eos", out
    jsonschema.validate(json.loads(out), SCHEMA)
    out = fast_llm.generate("A JSON object describing a cat:", response_format={"type": "json_object"},
                            temperature=0.7, top_k=40, top_p=0.9, seed=1, max_new_tokens=60)
    assert feed_text(start(OBJECT), str(out)) is not None
    if out.finish_reason == "eos":
        assert isinstance(json.loads(out), dict)


def test_a_bad_response_format_is_refused_by_name(fast_llm):
    from llmos.errors import LlmosError

    with pytest.raises(LlmosError) as err:
        fast_llm.generate("x", response_format={"type": "json_schema", "json_schema": {"schema": {"type": 3}}})
    assert err.value.param == "response_format.json_schema.schema"
    with pytest.raises(LlmosError, match="response_format must be"):
        fast_llm.generate("x", response_format={"type": "yaml"})
    with pytest.raises(LlmosError, match="beam search"):
        fast_llm.generate("x", response_format={"type": "json_object"}, num_beams=2)
