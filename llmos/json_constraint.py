"""Constrained decoding for `response_format` json_object and json_schema.

`JsonConstraint` is a logits mask (the engine's `masks` hook): at each step it lets
through only tokens whose text keeps the output a valid prefix of a JSON value, and the end token
only once the value is complete (after which only the end token is allowed). Validity is checked
character by character by a small pushdown automaton (`feed`) whose states are immutable tuples, so
trying a candidate token costs no copying. For speed only the few hundred most likely candidates are
tried; when none of them fits, the search widens to the rest of the vocabulary.

With a JSON schema the automaton also follows the schema's structure: `type` (object, array, string,
number, integer, boolean, null, or a list of them), `properties` with `required` and
`additionalProperties` (keys are limited to the listed properties unless additionalProperties is
true or a schema; `}` is refused until the required keys are present), `items`, `minItems`,
`maxItems`, `enum`, `const`, `maxLength`, `anyOf`/`oneOf` whose branches differ in JSON type, and
local `$ref`s into `$defs`/`definitions` (recursive ones too). Other keywords (pattern, format,
minimum...) are not enforced while decoding; `check_output` validates the finished text with the
`jsonschema` package when it is installed.

The engine applies masks after the penalties and before temperature and the top-k / top-p / min-p
warpers, so the warpers choose among the tokens the mask allows (had they run first they could keep
only tokens the mask then removes).

`parse_response_format` reads OpenAI's `response_format` ({"type": "text" | "json_object" |
"json_schema", "json_schema": {"schema": ...}}) into a `JsonFormat`; `generation.parse_controls`
calls it, so `llm.generate`, `llm.chat`, the server and `--json-schema` share one path.

Small models loop easily, so the automaton also bounds what JSON allows without limit: a key may not
repeat within an object, whitespace between tokens is capped (MAX_WS), and numbers have at most
MAX_NUMBER characters. Output cut short by max_tokens is a valid prefix, not a whole value.
"""

from __future__ import annotations

import json
import math
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from llmos.errors import LlmosError
from llmos.tokenizer import Tokenizer

KINDS = ("object", "array", "string", "number", "boolean", "null")
MAX_WS = 24  # whitespace allowed in one gap (a line break counts 8): a model cannot loop on blank space
MAX_NUMBER = 24  # characters in one number
CANDIDATES = 256

# --- schemas ---------------------------------------------------------------------------------------


class Node:
    """A compiled schema: which JSON kinds may appear here and what governs their contents."""

    __slots__ = ("kinds", "props", "required", "closed", "additional", "items", "min_items", "max_items",
                 "options", "integer", "max_length")

    def __init__(self) -> None:
        self.kinds: dict[str, Node] = {}
        self.props: dict[str, Node] = {}
        self.required: frozenset[str] = frozenset()
        self.closed = False  # keys limited to `props`
        self.additional: Node | None = None
        self.items: Node | None = None
        self.min_items, self.max_items = 0, None
        self.options: tuple[str, ...] | None = None  # enum/const: the JSON texts allowed
        self.integer = False
        self.max_length: int | None = None


def _any() -> Node:
    node = Node()
    node.kinds = {k: node for k in KINDS}
    node.additional = node
    node.items = node
    return node


ANY = _any()
OBJECT = Node()
OBJECT.kinds = {"object": OBJECT}
OBJECT.additional = ANY


def compile_schema(schema: Any) -> Node:
    """Compile a JSON schema (a dict, or True/None for any value) into the automaton's Node tree."""
    if not isinstance(schema, (dict, bool)) and schema is not None:
        raise LlmosError(f"a JSON schema must be an object, got {type(schema).__name__}")
    return _Compiler(schema if isinstance(schema, dict) else {}).compile(schema)


class _Compiler:
    def __init__(self, root: dict[str, Any]) -> None:
        self.root, self.refs = root, {}

    def compile(self, schema: Any) -> Node:
        if schema is None or schema is True or schema == {}:
            return ANY
        if not isinstance(schema, dict):  # False or junk: nothing sensible to constrain to
            return ANY
        if "$ref" in schema:
            return self._ref(schema["$ref"])
        node = Node()
        self._fill(node, schema)
        return node

    def _ref(self, ref: Any) -> Node:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise LlmosError(f"only local $ref values (#/$defs/...) are supported, got {ref!r}")
        if ref in self.refs:
            return self.refs[ref]
        target: Any = self.root
        for part in [p for p in ref[1:].split("/") if p]:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                raise LlmosError(f"$ref {ref!r} points nowhere in the schema")
            target = target[part]
        node = Node()
        self.refs[ref] = node  # before filling: a recursive schema refers back to itself
        if isinstance(target, dict) and "$ref" not in target:
            self._fill(node, target)
        else:
            other = self.compile(target)
            for slot in Node.__slots__:
                setattr(node, slot, getattr(other, slot))
        return node

    def _fill(self, node: Node, schema: dict[str, Any]) -> None:
        for key in ("anyOf", "oneOf"):
            if isinstance(schema.get(key), list) and schema[key]:
                branches = [self.compile(b) for b in schema[key]]
                for kind in KINDS:
                    owners = [b for b in branches if kind in b.kinds]
                    if owners:  # two branches of one kind: their contents are not told apart here
                        node.kinds[kind] = owners[0].kinds[kind] if len(owners) == 1 else ANY
                if any(b.options is not None for b in branches):
                    node.kinds = {k: ANY for k in KINDS}
                return
        all_of = schema.get("allOf")
        if isinstance(all_of, list) and len(all_of) == 1:
            self._fill(node, {**{k: v for k, v in schema.items() if k != "allOf"}, **all_of[0]})
            return
        if "const" in schema or isinstance(schema.get("enum"), list):
            values = [schema["const"]] if "const" in schema else schema["enum"]
            node.options = tuple(json.dumps(v, ensure_ascii=False, separators=(",", ":")) for v in values)
            node.kinds = {k: ANY for k in KINDS}
            return
        types = schema.get("type")
        if isinstance(types, str):
            types = [types]
        if not isinstance(types, list):
            if any(k in schema for k in ("properties", "required", "additionalProperties")):
                types = ["object"]
            elif any(k in schema for k in ("items", "minItems", "maxItems")):
                types = ["array"]
            else:
                types = list(KINDS)
        for t in types:
            kind = "number" if t == "integer" else t
            if kind in KINDS:
                node.kinds[kind] = node
        node.integer = "integer" in types and "number" not in types
        props = schema.get("properties")
        node.props = {str(k): self.compile(v) for k, v in props.items()} if isinstance(props, dict) else {}
        required = schema.get("required")
        node.required = frozenset(str(r) for r in required) if isinstance(required, list) else frozenset()
        additional = schema.get("additionalProperties")
        if isinstance(additional, dict):
            node.additional = self.compile(additional)
        elif additional is True or (additional is None and not node.props):
            node.additional = ANY
        node.closed = node.additional is None
        if node.closed:  # required keys must be typeable, or '}' could never come
            node.props = {**{r: ANY for r in node.required}, **node.props}
        node.items = self.compile(schema["items"]) if isinstance(schema.get("items"), dict) else ANY
        node.min_items = int(schema.get("minItems", 0) or 0)
        node.max_items = int(schema["maxItems"]) if isinstance(schema.get("maxItems"), int) else None
        node.max_length = int(schema["maxLength"]) if isinstance(schema.get("maxLength"), int) else None


# --- the automaton -----------------------------------------------------------------------------------
# A state is a tuple of frames, the innermost last. Frames:
#   ("root", node, done, ws)
#   ("obj", node, phase, used_keys, key, ws)   phase 0: after '{'  1: after ','  2: after a key
#                                              3: after ':'  4: after a value
#   ("key", buf, esc, names)                   names: the keys still allowed, None when any key is
#   ("arr", node, phase, count, ws)            phase 0: after '['  1: after ','  2: after a value
#   ("str", node, esc, length)                 esc 0: plain, 1: after '\', 2-5: in \uXXXX
#   ("num", integer, dfa_state, length)
#   ("lit", options, buf)                      true/false/null, enum and const values

State = tuple
WS = " \t\n\r"
_NUM_ACCEPT = frozenset((2, 3, 5, 8))


def start(node: Node) -> State:
    return (("root", node, False, 0),)


def _num_step(state: int, ch: str, integer: bool) -> int | None:
    digit = "0" <= ch <= "9"
    if state == 0:
        return 1 if ch == "-" else 2 if ch == "0" else 3 if digit else None
    if state == 1:
        return 2 if ch == "0" else 3 if digit else None
    if state in (2, 3):
        if state == 3 and digit:
            return 3
        if integer:
            return None
        return 4 if ch == "." else 6 if ch in "eE" else None
    if state == 4:
        return 5 if digit else None
    if state == 5:
        return 5 if digit else (6 if ch in "eE" else None)
    if state == 6:
        return 7 if ch in "+-" else 8 if digit else None
    if state in (7, 8):
        return 8 if digit else None
    return None


def _value(stack: State, node: Node, ch: str) -> State | None:
    """Start a value governed by `node` with its first character `ch`."""
    if node.options is not None:
        return stack + (("lit", node.options, ch),) if any(o.startswith(ch) for o in node.options) else None
    kind = ("object" if ch == "{" else "array" if ch == "[" else "string" if ch == '"' else
            "number" if ch == "-" or "0" <= ch <= "9" else "boolean" if ch in "tf" else "null" if ch == "n" else None)
    sub = node.kinds.get(kind) if kind else None
    if sub is None:
        return None
    if kind == "object":
        return stack + (("obj", sub, 0, frozenset(), None, 0),)
    if kind == "array":
        return stack + (("arr", sub, 0, 0, 0),)
    if kind == "string":
        return stack + (("str", sub, 0, 0),)
    if kind == "number":
        return stack + (("num", sub.integer, _num_step(0, ch, sub.integer), 1),)
    return stack + (("lit", ("true", "false") if kind == "boolean" else ("null",), ch),)


def _closed(stack: State) -> State:
    """The value on top of `stack`'s parent just ended: move the parent past it."""
    parent = stack[-1]
    kind = parent[0]
    if kind == "root":
        return stack[:-1] + (("root", parent[1], True, 0),)
    if kind == "obj":
        _, node, _, used, key, _ = parent
        return stack[:-1] + (("obj", node, 4, used | {key}, None, 0),)
    _, node, _, count, _ = parent  # arr
    return stack[:-1] + (("arr", node, 2, count + 1, 0),)


def _keys_left(node: Node, used: frozenset[str]) -> tuple[str, ...] | None:
    if not node.closed:
        return None
    return tuple(k for k in node.props if k not in used and not any(c in k for c in '"\\') and k.isprintable())


def _ws(stack: State, ws_index: int, ch: str) -> State | None:
    top = stack[-1]
    used = top[ws_index] + (8 if ch in "\r\n" else 1)
    if used > MAX_WS:
        return None
    return stack[:-1] + (top[:ws_index] + (used,) + top[ws_index + 1:],)


def feed(stack: State, ch: str) -> State | None:
    """The state after one more character, or None when `ch` cannot continue valid JSON here."""
    top = stack[-1]
    kind = top[0]
    if kind == "str":
        _, node, esc, length = top
        if esc == 0:
            if ch == '"':
                return _closed(stack[:-1])
            if ch < " " or (node.max_length is not None and length >= node.max_length):
                return None
            if ch == "\\":
                return stack[:-1] + (("str", node, 1, length),)
            return stack[:-1] + (("str", node, 0, length + 1),)
        if esc == 1:
            if ch in '"\\/bfnrt':
                return stack[:-1] + (("str", node, 0, length + 1),)
            return stack[:-1] + (("str", node, 2, length),) if ch == "u" else None
        if ch in "0123456789abcdefABCDEF":
            return stack[:-1] + (("str", node, 0 if esc == 5 else esc + 1, length + (esc == 5)),)
        return None
    if kind == "key":
        _, buf, esc, names = top
        if names is not None:  # only the listed keys, typed without escapes
            if ch == '"':
                return _key_done(stack[:-1], buf) if buf in names else None
            buf += ch
            return stack[:-1] + (("key", buf, 0, names),) if any(n.startswith(buf) for n in names) else None
        if esc == 0:
            if ch == '"':  # a key may not repeat (a small model would loop on one)
                key = json.loads('"' + buf + '"')
                return None if key in stack[-2][3] else _key_done(stack[:-1], key)
            if ch < " ":
                return None
            return stack[:-1] + (("key", buf + ch, 1 if ch == "\\" else 0, None),)
        if esc == 1:
            if ch in '"\\/bfnrt':
                return stack[:-1] + (("key", buf + ch, 0, None),)
            return stack[:-1] + (("key", buf + ch, 2, None),) if ch == "u" else None
        if ch in "0123456789abcdefABCDEF":
            return stack[:-1] + (("key", buf + ch, 0 if esc == 5 else esc + 1, None),)
        return None
    if kind == "num":
        _, integer, state, length = top
        nxt = _num_step(state, ch, integer) if length < MAX_NUMBER else None
        if nxt is not None:
            return stack[:-1] + (("num", integer, nxt, length + 1),)
        if state in _NUM_ACCEPT:
            parent = _closed(stack[:-1])
            return feed(parent, ch)
        return None
    if kind == "lit":
        _, options, buf = top
        longer = buf + ch
        if any(o.startswith(longer) for o in options):
            return stack[:-1] + (("lit", options, longer),)
        if buf in options:
            return feed(_closed(stack[:-1]), ch)
        return None
    if kind == "root":
        _, node, done, _ = top
        if done:
            return None
        return _ws(stack, 3, ch) if ch in WS else _value(stack, node, ch)
    if kind == "obj":
        _, node, phase, used, key, _ = top
        if ch in WS:
            return _ws(stack, 5, ch)
        if phase in (0, 1) and ch == '"':
            names = _keys_left(node, used)
            if names is not None and not names:
                return None
            return stack + (("key", "", 0, names),)
        if ch == "}" and phase in (0, 4):
            return _closed(stack[:-1]) if node.required <= used else None
        if phase == 2:
            return stack[:-1] + (("obj", node, 3, used, key, 0),) if ch == ":" else None
        if phase == 3:
            sub = node.props.get(key) or node.additional or ANY
            return _value(stack, sub, ch)
        if phase == 4 and ch == ",":
            names = _keys_left(node, used)
            return stack[:-1] + (("obj", node, 1, used, None, 0),) if names is None or names else None
        return None
    if kind == "arr":
        _, node, phase, count, _ = top
        if ch in WS:
            return _ws(stack, 4, ch)
        if ch == "]" and (phase == 2 or (phase == 0 and count == 0)):
            return _closed(stack[:-1]) if count >= node.min_items else None
        if phase in (0, 1):
            if node.max_items is not None and count >= node.max_items:
                return None
            return _value(stack, node.items or ANY, ch)
        if phase == 2 and ch == ",":
            if node.max_items is not None and count >= node.max_items:
                return None
            return stack[:-1] + (("arr", node, 1, count, 0),)
        return None
    return None


def _key_done(stack: State, key: str) -> State:
    _, node, _, used, _, _ = stack[-1]
    return stack[:-1] + (("obj", node, 2, used, key, 0),)


def feed_text(stack: State | None, text: str) -> State | None:
    for ch in text:
        if stack is None:
            return None
        stack = feed(stack, ch)
    return stack


def complete(stack: State) -> bool:
    """True when the text so far is a whole JSON value (nothing more may follow it)."""
    top = stack[-1]
    if top[0] == "root":
        return top[2]
    if len(stack) == 2:  # a bare number or literal at the top level ends where the text ends
        if top[0] == "num":
            return top[2] in _NUM_ACCEPT
        if top[0] == "lit":
            return top[2] in top[1]
    return False


# --- token texts and the processor ---------------------------------------------------------------------


class TokenTexts:
    """The text each token id adds when it follows other text, computed on demand and cached.

    Decoded after a reference token, so a SentencePiece token's leading space is kept; bytes that do
    not finish a UTF-8 character come out as U+FFFD, which the automaton accepts only inside strings
    (where any non-ASCII character is valid, so the real characters are too).
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ref = tokenizer.encode("a", add_special_tokens=False)[-1:]
        self.ref_text = tokenizer.decode(self.ref, skip_special_tokens=True)
        self.cache: dict[int, str] = {}
        self._by_first: dict[str, torch.Tensor] | None = None

    def by_prefix(self) -> dict[str, torch.Tensor]:
        """Token ids grouped by the first two characters of their text (built once, for wide searches)."""
        if self._by_first is None:
            groups: dict[str, list[int]] = {}
            for token in range(self.tokenizer.vocab_size):
                text = self[token]
                if text:
                    groups.setdefault(text[:2], []).append(token)
            self._by_first = {c: torch.tensor(ids, dtype=torch.long) for c, ids in groups.items()}
        return self._by_first

    def __getitem__(self, token: int) -> str:
        text = self.cache.get(token)
        if text is None:
            full = self.tokenizer.decode(self.ref + [token], skip_special_tokens=True)
            text = full[len(self.ref_text):] if full.startswith(self.ref_text) else full
            if token in self.tokenizer.special_ids:
                text = ""
            self.cache[token] = text
        return text


class JsonConstraint:
    """Logits mask: only tokens that keep each row a valid JSON prefix (see module docstring).

    `prompt_len` tells where generated tokens begin in the ids the engine passes."""

    def __init__(self, texts: TokenTexts, schema: Node, prompt_len: int, stop_ids: frozenset[int], *,
                 candidates: int = CANDIDATES) -> None:
        self.texts, self.schema, self.prompt_len = texts, schema, prompt_len
        self.stop_ids = sorted(stop_ids)
        self._stops = frozenset(stop_ids)  # for membership tests, per token tried
        self.candidates = candidates
        self.rows: dict[int, tuple[int, State | None]] = {}  # row -> (tokens consumed, state; None once ended)

    def _state(self, row: int, ids: torch.Tensor) -> State | None:
        """The row's state after its generated ids (1-D); only the ids not consumed yet are read."""
        consumed, state = self.rows.get(row, (0, start(self.schema)))
        for token in ids[consumed:].tolist():
            if state is None:
                break
            state = None if token in self._stops else feed_text(state, self.texts[token])
        self.rows[row] = (ids.shape[0], state)
        return state

    def allowed(self, state: State, logits: torch.Tensor) -> list[int]:
        """Token ids (most likely first among the tried) that may come next from `state`."""
        if complete(state):
            return [t for t in self.stop_ids if t < logits.shape[0]]
        top = logits.topk(min(self.candidates, logits.shape[0]))
        order = [t for t, v in zip(top.indices.tolist(), top.values.tolist()) if v > -math.inf]
        found = self._fits(state, order)
        if not found:  # widen to every token whose first character may come next
            firsts: dict[str, State | None] = {}
            pools = []
            for prefix, ids in self.texts.by_prefix().items():
                if prefix[0] not in firsts:
                    firsts[prefix[0]] = feed(state, prefix[0])
                after = firsts[prefix[0]]
                if after is not None and (len(prefix) == 1 or feed(after, prefix[1]) is not None):
                    pools.append(ids)
            if pools:
                pool = torch.cat(pools)
                scores = logits[pool]
                first = scores.topk(min(2048, pool.numel()))  # the likeliest first: usually enough
                found = self._fits(state, [int(pool[i]) for i, v in zip(first.indices.tolist(), first.values.tolist())
                                           if v > -math.inf])
                if not found and pool.numel() > 2048:
                    found = self._fits(state, [t for t, v in zip(pool.tolist(), scores.tolist()) if v > -math.inf])
        return found

    def _fits(self, state: State, tokens: list[int]) -> list[int]:
        stops = self._stops
        out = []
        for t in tokens:
            text = self.texts[t]
            if text and t not in stops and feed_text(state, text) is not None:
                out.append(t)
        return out

    def __call__(self, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        out = torch.full_like(logits, -math.inf)  # (B, V)
        for row in range(logits.shape[0]):
            state = self._state(row, ids[row, self.prompt_len:])
            if state is None:  # this row already ended: the engine ignores what it samples
                out[row] = logits[row]
                continue
            keep = self.allowed(state, logits[row])
            if not keep:  # nothing fits (every candidate banned): end rather than emit junk
                keep = self.stop_ids
            idx = torch.tensor(keep, dtype=torch.long)
            vals = logits[row, idx]
            out[row, idx] = torch.where(torch.isfinite(vals), vals, torch.zeros_like(vals))
        return out


_TEXTS: weakref.WeakKeyDictionary[Tokenizer, TokenTexts] = weakref.WeakKeyDictionary()


def token_texts(tokenizer: Tokenizer) -> TokenTexts:
    """The tokenizer's TokenTexts, built once and kept while the tokenizer lives (its texts are
    decoded on demand and cached: a second request reuses them)."""
    texts = _TEXTS.get(tokenizer)
    if texts is None:
        texts = _TEXTS[tokenizer] = TokenTexts(tokenizer)
    return texts


@dataclass(frozen=True)
class JsonFormat:
    """A parsed response_format: the automaton's schema, and the JSON schema to check the finished
    text against (None for json_object: any object)."""

    node: Node
    schema: dict[str, Any] | None

    def mask(self, tokenizer: Tokenizer, prompt_len: int) -> JsonConstraint:
        return JsonConstraint(token_texts(tokenizer), self.node, prompt_len, tokenizer.stop_ids)

    def problem(self, text: str) -> str | None:
        """Why finished `text` does not match the format (None when it does, or cannot be checked)."""
        return check_output(text, self.schema)


def parse_response_format(rf: Any) -> JsonFormat | None:
    """OpenAI's response_format as a JsonFormat; None for {"type": "text"}. LlmosError names what is wrong."""
    if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema"):
        raise LlmosError('response_format must be {"type": "text" | "json_object" | "json_schema", ...}, '
                         f"got {rf!r}", param="response_format")
    if rf["type"] == "text":
        return None
    if rf["type"] == "json_object":
        return JsonFormat(OBJECT, None)
    spec = rf.get("json_schema")
    if not isinstance(spec, dict):
        raise LlmosError('response_format of type json_schema needs {"json_schema": {"schema": {...}}}',
                         param="response_format.json_schema")
    if spec.get("schema") is None:  # a named format with no schema: any JSON object
        return JsonFormat(OBJECT, None)
    return JsonFormat(check_schema(spec["schema"]), spec["schema"])


def check_schema(schema: Any) -> Node:
    """`schema` compiled for the automaton; LlmosError when it is not a usable JSON schema."""
    if not isinstance(schema, dict):
        raise LlmosError(f"response_format.json_schema.schema must be an object, got {type(schema).__name__}",
                         param="response_format.json_schema.schema")
    try:
        import jsonschema
    except ImportError:
        jsonschema = None
    if jsonschema is not None:
        try:
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except jsonschema.SchemaError as exc:
            raise LlmosError(f"response_format.json_schema.schema is not a valid JSON schema: {exc.message}",
                             param="response_format.json_schema.schema") from exc
    try:
        return compile_schema(schema)
    except LlmosError as exc:
        raise LlmosError(str(exc), param="response_format.json_schema.schema") from None


def check_output(text: str, schema: dict[str, Any] | None) -> str | None:
    """Why `text` is not a JSON value matching `schema` (None when it is, or cannot be checked)."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        return f"not valid JSON: {exc}"
    if schema is None:
        return None if isinstance(value, dict) else "not a JSON object"
    try:
        import jsonschema
    except ImportError:
        return None
    error = jsonschema.exceptions.best_match(jsonschema.validators.validator_for(schema)(schema).iter_errors(value))
    return None if error is None else error.message
