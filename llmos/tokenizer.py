"""Text <-> token ids, chat templates and streaming detokenization.

A `Tokenizer` wraps a `tokenizers.Tokenizer` (the Rust library does the splitting and merging) and
adds what a model file says about it: BOS/EOS/pad ids, which ids end a turn, and the chat template.
It is built at the format boundary:

- `Tokenizer.from_gguf(metadata)` rebuilds the tokenizer a GGUF file describes from its
  `tokenizer.ggml.*` metadata (already parsed into a plain dict). Byte-level BPE ("gpt2") splits text
  with the regexes llama.cpp picks by `tokenizer.ggml.pre`; SentencePiece BPE ("llama") becomes a BPE
  with byte fallback whose merges are derived from the piece scores. Gemma's files have no merges and
  rank them by the pieces' order: `llmos.spm.SentencePieceBPE` encodes and decodes by that rank from
  the vocabulary alone, and the `tokenizers` backend, whose 515k merges take ~0.5 s to build (deriving
  them ~1 s more, which a `merges_cache` file keyed by the GGUF's content saves; the loader keeps it in
  the store), is built only when asked for (`backend`, `to_json`: export). Anything else is refused.
- `Tokenizer.from_dir(folder)` loads a Hugging Face folder: `tokenizer.json` plus the small JSON files
  next to it that name the special tokens and hold the chat template.

Contract: `encode` adds BOS/EOS only where the model says so (`add_special_tokens=True`), and special
tokens written in the text (`"<|im_start|>"`) become single ids: it is for trusted prompts.
`chat_ids` is for conversations, whose message texts are untrusted: only the template's own markup
becomes special ids; a special token's spelling inside a message encodes as ordinary characters, so
no message can forge a turn (transformers' `split_special_tokens`, llama.cpp's `parse_special=false`). `decode(encode(t), ...)` gives `t`
back for byte-level tokenizers. `IncrementalDecoder` turns a stream of ids into text pieces whose
concatenation equals `decode(all_ids)`, never emitting half a UTF-8 character. Chat templates run in
jinja2's immutable sandbox; a template that reaches for Python internals gets a `TokenizerError`.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import itertools
import json
import os
import re
import secrets
import struct
from array import array
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend

from llmos.errors import LlmosError
from llmos.files import write_atomically
from llmos.spm import SentencePieceBPE


class TokenizerError(LlmosError):
    """A tokenizer llmos cannot build or use, or input it cannot take: the message says which and why."""


# --- GGUF pre-tokenizers ------------------------------------------------------------------------
# llama.cpp (src/llama-vocab.cpp) picks a list of split regexes by `tokenizer.ggml.pre`; each regex
# cuts the pieces left by the one before it, keeping matches and gaps alike ("isolated"). The
# regexes below are the ones its model families were trained with, written for Oniguruma (which the
# `tokenizers` library uses), so `\p{Lu}` etc. stay as in the original tokenizer.json files.
# Contractions are spelled out case by case, as llama.cpp does, instead of `(?i:...)`, which would
# also fold Unicode look-alikes (the Kelvin sign, long s).

_CONTRACTIONS = r"'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD]"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    rf"(?:{_CONTRACTIONS})|[^\r\n\p{{L}}\p{{N}}]?\p{{L}}+|\p{{N}}{{1,3}}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
_UPPER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]"
_LOWER = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_TEKKEN = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+(?:{_CONTRACTIONS})?"
    rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*(?:{_CONTRACTIONS})?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _pre(splits: tuple[str, ...], *, ignore_merges: bool = False, add_bos: bool = False) -> dict[str, Any]:
    return {"splits": splits, "ignore_merges": ignore_merges, "add_bos": add_bos}


def _family(names: str, **spec: Any) -> dict[str, dict[str, Any]]:
    return {name: _pre(**spec) for name in names.split()}


# `tokenizer.ggml.pre` -> how to split; `add_bos` is llama.cpp's default when the file has no
# `tokenizer.ggml.add_bos_token`. A missing `pre` means "default", as in llama.cpp.
GGUF_PRE_TOKENIZERS: dict[str, dict[str, Any]] = {
    "default": _pre((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")),
    **_family("gpt-2 phi-2 mpt olmo jais exaone4 jina-es jina-de gigachat mellum trillion", splits=(_GPT2,)),
    **_family("starcoder refact command-r smollm codeshell exaone minerva-7b", splits=(r"\p{N}", _GPT2)),
    **_family(
        "llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2",
        splits=(_LLAMA3,),
        ignore_merges=True,
        add_bos=True,
    ),
    **_family("dbrx smaug-bpe", splits=(_LLAMA3,)),
    **_family("qwen2 deepseek-r1-qwen megrez stablelm2 kormo f2llmv2", splits=(_QWEN2,)),
    "tekken": _pre((_TEKKEN,), ignore_merges=True, add_bos=True),
    **_family("gpt-4o llama4 kanana2 minimax-m2", splits=(_GPT4O,)),
    "falcon": _pre((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]")),
}

# GGUF token types (gguf-py `TokenType`).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# Tokens that end a turn in the chat formats we know; llama.cpp treats the same set as
# end-of-generation when the vocabulary marks them special.
_END_OF_TURN = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "<end_of_utterance>",
    "<\uff5cend\u2581of\u2581sentence\uff5c>",  # DeepSeek's full-width bars
)

_SPM_SPACE = "\u2581"  # SentencePiece writes spaces as "▁"


class Tokenizer:
    """Encode text to ids and back, render chat templates, and stream-decode generated ids.

    Build with `from_gguf` or `from_dir`. Attributes: `vocab_size`, `bos_id`, `eos_id`, `pad_id`
    (None when the model has none), `stop_ids` (EOS plus end-of-turn tokens: generation stops on any),
    `special_ids` (control tokens, hidden by `decode(..., skip_special_tokens=True)`), `chat_template`.
    """

    def __init__(
        self,
        backend: _Backend | Callable[[], _Backend],
        *,
        encoder: SentencePieceBPE | None = None,
        bos_id: int | None = None,
        eos_id: int | None = None,
        pad_id: int | None = None,
        stop_ids: frozenset[int] = frozenset(),
        special_ids: frozenset[int] = frozenset(),
        chat_template: str | None = None,
    ) -> None:
        """`backend`: the `tokenizers.Tokenizer`, or a function that builds it when it is first needed
        (`backend`, `to_json`), for an `encoder` that encodes and decodes in its place."""
        if isinstance(backend, _Backend):
            self._backend = backend
        else:
            self._build_backend = backend
        self._encoder = encoder
        self.vocab_size: int = (
            encoder.vocab_size if encoder is not None else self._backend.get_vocab_size(with_added_tokens=True)
        )
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.stop_ids: frozenset[int] = frozenset(stop_ids) | ({eos_id} if eos_id is not None else set())
        self.special_ids: frozenset[int] = frozenset(special_ids)
        self.chat_template = chat_template

    # --- construction ---------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, metadata: Mapping[str, Any], merges_cache: Path | None = None) -> Tokenizer:
        """The tokenizer a GGUF file describes, from its parsed metadata (`tokenizer.ggml.*` keys).

        `merges_cache`: a file keyed by the GGUF's content where the merges derived from a Gemma
        vocabulary are kept (see `derives_merges`): read when it is there and whole, written otherwise."""
        kind = metadata.get("tokenizer.ggml.model")
        if kind is None or "tokenizer.ggml.tokens" not in metadata:
            raise TokenizerError(
                "this GGUF file has no tokenizer (no tokenizer.ggml.model / tokenizer.ggml.tokens); "
                "use a GGUF converted with its vocabulary, or load the model's Hugging Face folder"
            )
        # The parser hands over str; only a caller's bytes need `_text` (a type check per piece, not a call).
        tokens = [t if t.__class__ is str else _text(t) for t in metadata["tokenizer.ggml.tokens"]]
        raw_types = metadata.get("tokenizer.ggml.token_type")
        types = list(map(int, raw_types)) if raw_types is not None else [_NORMAL] * len(tokens)
        if len(types) != len(tokens):
            raise TokenizerError(f"GGUF tokenizer has {len(tokens)} tokens but {len(types)} token types")
        stored = tokens  # as the file spells them (Gemma's are respelled below)

        gemma = derives_merges(metadata)
        if gemma:
            stored, tokens = tokens, _gemma_spelling(tokens)
            vocab = dict(zip(tokens, range(len(tokens))))  # a repeated piece keeps its last id, as in transformers
            add_bos = True  # SentencePiece models add BOS unless the file says otherwise, as in llama.cpp
        elif kind in ("gpt2", "llama"):
            # A duplicated piece keeps its first id, as in llama.cpp's lookup: walked backwards, it is written last.
            vocab = dict(zip(reversed(tokens), range(len(tokens) - 1, -1, -1)))
            if kind == "gpt2":
                backend, add_bos = _byte_level_bpe(metadata, vocab)
            else:
                backend, add_bos = _sentencepiece_bpe(metadata, tokens, types, vocab)
        else:
            raise TokenizerError(
                f"GGUF tokenizer model {kind!r} is not supported (llmos reads 'gpt2' byte-level BPE and "
                "'llama' SentencePiece BPE); load the model's Hugging Face folder with tokenizer.json instead"
            )

        # Control tokens are special (skipped on request when decoding); user-defined ones, like
        # `<think>`, are plain added tokens. Both are matched whole in the text, as llama.cpp does.
        # Their ids already exist in the vocabulary, so adding them creates no new ids.
        control = [t for t, ty in zip(tokens, types) if ty == _CONTROL]
        user_defined = [t for t, ty in zip(stored, types) if ty == _USER_DEFINED and t in vocab]

        def token_id(key: str) -> int | None:
            value = metadata.get(f"tokenizer.ggml.{key}")
            if value is None or int(value) < 0:
                return None
            if int(value) >= len(tokens):
                raise TokenizerError(
                    f"GGUF tokenizer.ggml.{key} = {int(value)} is outside the vocabulary of {len(tokens)}"
                )
            return int(value)

        bos_id, eos_id, pad_id = token_id("bos_token_id"), token_id("eos_token_id"), token_id("padding_token_id")
        add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", add_bos))
        add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
        bos, eos = bos_id if add_bos else None, eos_id if add_eos else None

        def finish(backend: _Backend) -> _Backend:
            backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
            backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user_defined])
            backend.post_processor = _bos_eos_template(backend, bos, eos)
            return backend

        encoder = None
        if gemma:
            # The tokenizers library would need Gemma's 515k merges spelled out (~0.5 s to build): the
            # encoder ranks them from the vocabulary instead, and the backend is built only if asked for.
            unk, add_prefix = _unk_piece(metadata, tokens), bool(metadata.get("tokenizer.ggml.add_space_prefix", False))
            encoder = SentencePieceBPE(tokens, vocab, unk=unk, add_prefix=add_prefix, added=[*control, *user_defined],
                                       special=control, bos_id=bos, eos_id=eos)

            def build_gemma() -> _Backend:
                return finish(_gemma_sentencepiece(tokens, vocab, unk, add_prefix, merges_cache))

        special_ids = frozenset(vocab[t] for t in control)
        stop_ids = frozenset(vocab[t] for t in _END_OF_TURN if t in vocab and vocab[t] in special_ids)
        stop_ids |= {i for i in (token_id("eot_token_id"), token_id("eom_token_id")) if i is not None}
        template = metadata.get("tokenizer.chat_template")
        return cls(
            build_gemma if gemma else finish(backend),
            encoder=encoder,
            bos_id=bos_id,
            eos_id=eos_id,
            pad_id=pad_id,
            stop_ids=stop_ids,
            special_ids=special_ids,
            chat_template=str(template) if template else None,
        )

    @classmethod
    def from_dir(cls, folder: str | os.PathLike[str]) -> Tokenizer:
        """The tokenizer of a Hugging Face model folder: `tokenizer.json` plus, when present,
        `tokenizer_config.json`, `special_tokens_map.json`, `generation_config.json` and `chat_template.jinja`.

        `tokenizer.json`'s post-processor decides what `encode` adds (BOS, or BERT's [CLS]/[SEP]), as in
        transformers; `add_bos_token`/`add_eos_token` from the config apply only when it has none.
        """
        root = Path(folder)
        path = root / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(
                f"no tokenizer.json in {root}: llmos reads fast-tokenizer folders; re-save the tokenizer "
                "with transformers (AutoTokenizer.from_pretrained(...).save_pretrained(folder)) to create one"
            )
        try:
            backend = _Backend.from_file(str(path))
        except Exception as e:  # the Rust side raises plain Exception for malformed files
            raise TokenizerError(f"cannot read {path}: {e}") from e
        # sentence-transformers saves fixed-length padding and truncation into tokenizer.json; one
        # text's ids must be just its ids (callers batch and truncate themselves), as in transformers.
        backend.no_padding()
        backend.no_truncation()
        config = _read_json(root / "tokenizer_config.json")
        special_map = _read_json(root / "special_tokens_map.json")
        generation = _read_json(root / "generation_config.json")

        def named_id(name: str) -> int | None:
            content = _token_content(config.get(name, special_map.get(name)))
            return backend.token_to_id(content) if content is not None else None

        bos_id, eos_id, pad_id = named_id("bos_token"), named_id("eos_token"), named_id("pad_token")
        gen_eos = generation.get("eos_token_id", [])  # an int or a list of ints
        gen_eos_ids = [int(i) for i in (gen_eos if isinstance(gen_eos, list) else [gen_eos])]
        if eos_id is None and gen_eos_ids:
            eos_id = gen_eos_ids[0]
        add_bos, add_eos = bool(config.get("add_bos_token")), bool(config.get("add_eos_token"))
        if backend.post_processor is None and (add_bos or add_eos):
            backend.post_processor = _bos_eos_template(
                backend, bos_id if add_bos else None, eos_id if add_eos else None
            )

        added = backend.get_added_tokens_decoder()
        special_ids = frozenset(i for i, token in added.items() if token.special)
        stop_ids = {i for i in gen_eos_ids if 0 <= i < backend.get_vocab_size(with_added_tokens=True)}
        stop_ids |= {i for t in _END_OF_TURN if (i := backend.token_to_id(t)) in special_ids}
        return cls(
            backend,
            bos_id=bos_id,
            eos_id=eos_id,
            pad_id=pad_id,
            stop_ids=frozenset(stop_ids),
            special_ids=special_ids,
            chat_template=_read_chat_template(root, config),
        )

    # --- ids <-> text ---------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. With `add_special_tokens`, BOS/EOS are added where the model says so."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode takes a str, got {type(text).__name__}")
        return self._ids(text, add_special_tokens)

    def text_ids(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of untrusted text (a user's words, a document) for a prompt without a chat
        template: a special token spelled inside it encodes as ordinary characters, as in `chat_ids`;
        BOS/EOS are added as `encode` adds them."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode takes a str, got {type(text).__name__}")
        if self._encoder is None and (self._special_pattern is None or not self._special_pattern.search(text)):
            return self._ids(text, add_special_tokens)
        return self._ids(text, add_special_tokens, split_special=False)

    def _ids(self, text: str, add_special_tokens: bool, split_special: bool = True) -> list[int]:
        """`split_special=False`: special tokens' spellings encode as ordinary characters."""
        if self._encoder is None:
            return _encode(self._backend if split_special else self._plain_backend, text, add_special_tokens)
        if (bad := _SURROGATE.search(text)) is not None:
            raise _surrogate_error(text, bad.start())
        return self._encoder.encode(text, add_special_tokens, split_special)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """The text of `ids`; bytes that do not form whole UTF-8 characters decode to U+FFFD."""
        checked = [int(i) for i in ids]
        for i in checked:
            if not 0 <= i < self.vocab_size:
                raise TokenizerError(f"token id {i} is outside the vocabulary (0..{self.vocab_size - 1})")
        if self._encoder is not None:
            return self._encoder.decode(checked, skip_special_tokens)
        return self._backend.decode(checked, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str:
        """The raw vocabulary piece of id `i` (byte-level pieces look like "Ġthe")."""
        piece = self._piece(int(i)) if 0 <= int(i) < self.vocab_size else None
        if piece is None:
            raise TokenizerError(f"token id {i} is outside the vocabulary (0..{self.vocab_size - 1})")
        return piece

    token_to_str = id_to_token

    def token_bytes(self, i: int) -> bytes | None:
        """The raw bytes of token `i` when its piece spells them: a byte-fallback piece "<0xNN>", or
        any piece of a byte-level BPE vocabulary (GPT-2's alphabet maps back to bytes). None for
        other pieces, whose bytes are those of the text they decode to."""
        piece = self.id_to_token(i)
        if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
            return bytes([int(piece[3:5], 16)])
        alphabet = _byte_alphabet()
        if self._encoder is None and isinstance(self._backend.decoder, decoders.ByteLevel) and all(
            c in alphabet for c in piece
        ):
            return bytes(alphabet[c] for c in piece)
        return None

    def token_to_id(self, piece: str) -> int | None:
        """The id of a raw vocabulary piece, or None when the vocabulary lacks it."""
        if self._encoder is not None:
            return self._encoder.token_to_id(piece)
        return self._backend.token_to_id(piece)

    def _piece(self, i: int) -> str | None:
        return self._encoder.id_to_token(i) if self._encoder is not None else self._backend.id_to_token(i)

    @property
    def backend(self) -> _Backend:
        """The underlying `tokenizers.Tokenizer` (for export: its JSON is the portable format). With an
        encoder of its own (Gemma), the tokenizer builds it on first use (~0.5 s)."""
        return self._backend

    @functools.cached_property
    def _backend(self) -> _Backend:
        return self._build_backend()

    def to_json(self) -> str:
        """The tokenizer as Hugging Face `tokenizer.json` text."""
        return self._backend.to_str()

    def decoder(self, skip_special_tokens: bool = False) -> IncrementalDecoder:
        """A fresh streaming detokenizer for one generated sequence."""
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)

    # --- chat -----------------------------------------------------------------------------------

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True, *, template: str | None = None,
        **extra: Any
    ) -> str:
        """Render `messages` ([{"role": ..., "content": ...}, ...]) with the model's chat template
        (or `template`, a Jinja source given instead).

        Runs the template as transformers does (trim_blocks, lstrip_blocks, `raise_exception`, a
        `tojson` that does not escape HTML) in jinja2's immutable sandbox. `bos_token`/`eos_token` are
        defined; `extra` adds or overrides template variables (`tools=...`, `enable_thinking=False`).
        """
        source = self.chat_template if template is None else template
        if source is None:
            raise TokenizerError(
                "this model has no chat template, so it cannot format a conversation; "
                "prompt it with plain text (completion) instead"
            )
        variables: dict[str, Any] = {"tools": None, "documents": None}
        for name, i in (("bos_token", self.bos_id), ("eos_token", self.eos_id), ("pad_token", self.pad_id)):
            variables[name] = self._piece(i) if i is not None else None
        variables.update(extra)
        variables["messages"] = _checked_messages(messages)
        variables["add_generation_prompt"] = add_generation_prompt
        compiled = _compile_template(source)
        try:
            return compiled.render(**variables)
        except jinja2.exceptions.SecurityError as e:
            raise TokenizerError(f"the chat template tried an unsafe operation and was stopped: {e}") from e
        except jinja2.exceptions.TemplateError as e:
            raise TokenizerError(f"the chat template refused this conversation: {e}") from e
        except Exception as e:  # the template is foreign code; any failure in it is the model's, not ours
            raise TokenizerError(f"the chat template failed: {type(e).__name__}: {e}") from e

    def chat_ids(self, messages: list[dict[str, str]], add_generation_prompt: bool = True, *,
                 template: str | None = None, variables: Mapping[str, Any] | None = None) -> list[int]:
        """Token ids of a conversation rendered with the chat template (no BOS/EOS beyond what the
        template writes); `template` and `variables` as in `apply_chat_template`. Message contents are
        text: a special token spelled inside one (a user's `<|im_end|>\n<|im_start|>system`) encodes
        as ordinary characters, never as the special id."""
        pattern = self._special_pattern
        literals: list[str] = []
        nonce = secrets.token_hex(8)  # unguessable: a message cannot spell a placeholder itself

        def hide(match: re.Match[str]) -> str:
            literals.append(match.group())
            return f"\ue000{nonce}.{len(literals) - 1}\ue001"

        checked = _checked_messages(messages)
        if pattern is not None:
            checked = [{**m, "content": pattern.sub(hide, m["content"])} if isinstance(m.get("content"), str) else m
                       for m in checked]
        extra = {k: v for k, v in (variables or {}).items() if k not in ("template", "add_generation_prompt")}
        text = self.apply_chat_template(checked, add_generation_prompt=add_generation_prompt, template=template, **extra)
        if not literals:
            return self.encode(text, add_special_tokens=False)
        # The markup's special tokens split the text, as the backend itself splits it; each piece
        # between them gets its hidden literals back and is encoded with special tokens as text.
        placeholder = re.compile(f"\ue000{nonce}\\.(\\d+)\ue001")
        ids: list[int] = []
        pos = 0
        for match in [*pattern.finditer(text), None]:
            piece = text[pos:match.start() if match else len(text)]
            if piece:
                piece = placeholder.sub(lambda m: literals[int(m.group(1))], piece)
                ids += self._ids(piece, False, split_special=False)
            if match:
                ids.append(self.token_to_id(match.group()))
                pos = match.end()
        return ids

    @functools.cached_property
    def _special_pattern(self) -> re.Pattern[str] | None:
        """A regex matching any special token's text, longest first (None: the vocabulary has none)."""
        if self._encoder is not None:
            specials = self._encoder.special
        else:
            specials = {t.content for t in self._backend.get_added_tokens_decoder().values() if t.special}
        texts = sorted(specials, key=len, reverse=True)
        return re.compile("|".join(map(re.escape, texts))) if texts else None

    @functools.cached_property
    def _plain_backend(self) -> _Backend:
        """A copy of the backend that encodes special tokens' spellings as ordinary text (a copy, so
        the shared backend's setting never changes under another thread)."""
        plain = _Backend.from_str(self._backend.to_str())
        plain.encode_special_tokens = True
        return plain

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id})"


class IncrementalDecoder:
    """Streaming detokenizer: `push` ids one at a time and get the text each one completes.

    Text is decoded over a short window of trailing ids (vLLM's prefix/read offsets): the window's
    first ids are context already emitted, which keeps leading-space rules and multi-token UTF-8
    characters right. Output is held back while the window ends in an incomplete character (U+FFFD),
    so pieces never split a character, and `"".join(pieces) + flush()` equals `decode(all_ids)`
    less the bytes of a character the stream ended in the middle of (a generation cut by its length
    limit): those are dropped, not shown as a U+FFFD the model never wrote. Each push costs
    O(window), not O(sequence).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []  # only the window: emitted context ids, then those not emitted yet
        self._read = 0  # ids before this have been emitted (the window's context)
        self._prefix_text: str | None = None  # decode of ids[:_read], cached

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes (possibly "")."""
        self._ids.append(int(token_id))
        prefix_text, text = self._window()
        if len(text) > len(prefix_text) and not text.endswith("\ufffd"):
            return self._advance(text[len(prefix_text) :])
        return ""

    def flush(self) -> str:
        """The text still held back, at end of stream, without the trailing incomplete character
        (which decodes to U+FFFD) that made it wait."""
        if self._read == len(self._ids):
            return ""
        prefix_text, text = self._window()
        return self._advance(text[len(prefix_text) :].rstrip("\ufffd"))

    def _window(self) -> tuple[str, str]:
        decode = self._tokenizer.decode
        if self._prefix_text is None:
            self._prefix_text = decode(self._ids[: self._read], self._skip)
        return self._prefix_text, decode(self._ids, self._skip)

    def _advance(self, piece: str) -> str:
        # The emitted ids become the next window's context; older ids are no longer needed.
        del self._ids[: self._read]
        self._read = len(self._ids)
        self._prefix_text = None
        return piece


_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _encode(backend: _Backend, text: str, add_special_tokens: bool) -> list[int]:
    try:
        return backend.encode(text, add_special_tokens=add_special_tokens).ids
    except TypeError:  # the Rust side takes only valid Unicode; say where it is not
        bad = _SURROGATE.search(text)
        if bad is None:
            raise
        raise _surrogate_error(text, bad.start()) from None


def _surrogate_error(text: str, at: int) -> TokenizerError:
    return TokenizerError(f"the text holds a lone UTF-16 surrogate (U+{ord(text[at]):04X} at character {at}), "
                          "which is not valid Unicode; pass valid text")


# --- GGUF builders ------------------------------------------------------------------------------


@functools.cache
def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:  # bytes without a printable character take 256, 257, ...
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _byte_level_bpe(metadata: Mapping[str, Any], vocab: dict[str, int]) -> tuple[_Backend, bool]:
    """GPT-2-style byte-level BPE: split by `tokenizer.ggml.pre`'s regexes, map bytes to the
    printable alphabet, merge by the file's ranked merges. Returns (backend, default add_bos)."""
    pre_name = str(metadata.get("tokenizer.ggml.pre") or "default")
    spec = GGUF_PRE_TOKENIZERS.get(pre_name)
    if spec is None:
        raise TokenizerError(
            f"GGUF pre-tokenizer {pre_name!r} is not supported; supported: {', '.join(sorted(GGUF_PRE_TOKENIZERS))}. "
            "Load the model's Hugging Face folder with tokenizer.json instead"
        )
    merges = _merges(metadata)
    try:
        model = models.BPE(vocab=vocab, merges=merges, ignore_merges=spec["ignore_merges"], fuse_unk=False)
    except Exception as e:  # a merge naming a piece that is not in the vocabulary
        raise TokenizerError(f"GGUF tokenizer merges do not match its vocabulary: {e}") from e
    backend = _Backend(model)
    splits = [pre_tokenizers.Split(Regex(pattern), behavior="isolated") for pattern in spec["splits"]]
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    return backend, spec["add_bos"]


def _sentencepiece_bpe(
    metadata: Mapping[str, Any], tokens: list[str], types: list[int], vocab: dict[str, int]
) -> tuple[_Backend, bool]:
    """SentencePiece BPE (Llama 2, Mistral 7B): spaces as "▁", optional leading "▁", unknown
    characters as <0xXX> byte tokens. The file stores scores, not merges; merging the adjacent pair
    whose joined piece scores highest is what SentencePiece does, so merges ranked by that score
    reproduce it. Returns (backend, default add_bos)."""
    merges = _merges(metadata)
    if not merges:
        scores = metadata.get("tokenizer.ggml.scores")
        if scores is None or len(scores) != len(tokens):
            raise TokenizerError("GGUF SentencePiece tokenizer has neither merges nor one score per token")
        merges = _merges_from_scores(tokens, types, [float(s) for s in scores], vocab)
    unk = _unk_piece(metadata, tokens)
    try:
        model = models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
    except Exception as e:
        raise TokenizerError(f"GGUF tokenizer merges do not match its vocabulary: {e}") from e
    backend = _Backend(model)
    add_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    escape = normalizers.Replace(" ", _SPM_SPACE)
    backend.normalizer = normalizers.Sequence([normalizers.Prepend(_SPM_SPACE), escape]) if add_prefix else escape
    steps = [decoders.Replace(_SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence([*steps, decoders.Strip(" ", 1, 0)] if add_prefix else steps)
    return backend, True


_GEMMA_ARCHS = ("gemma", "gemma2", "gemma3")


def derives_merges(metadata: Mapping[str, Any]) -> bool:
    """Whether this vocabulary's merges are derived from it (Gemma's SentencePiece files carry none):
    encoding needs none of them (`SentencePieceBPE`), its `tokenizers` backend ~1 s of deriving for
    Gemma's 262,144 pieces, which a `merges_cache` file saves."""
    return (metadata.get("tokenizer.ggml.model") == "llama" and metadata.get("general.architecture") in _GEMMA_ARCHS
            and "tokenizer.ggml.merges" not in metadata)


def _gemma_spelling(tokens: list[str]) -> list[str]:
    """Gemma's GGUF files store its tokens of two or more spaces as real spaces ("  "), where the text
    they match is spelled with "▁" after normalization: respelled here, as transformers' GGUF
    converter does, or those tokens (and the merges made of them) would never be reached."""
    return [_SPM_SPACE * len(t) if " " in t and not t.strip() else t for t in tokens]


def _gemma_sentencepiece(
    tokens: list[str], vocab: dict[str, int], unk: str | None, add_prefix: bool, merges_cache: Path | None
) -> _Backend:
    """Gemma's SentencePiece BPE from a GGUF without merges, as a `tokenizers` backend (`SentencePieceBPE`
    encodes the same way without one). Its scores do not follow the merge order; the order of the
    tokens in the file does, so each token's cuts into two known pieces are merges ranked by the
    token's position (the longer left piece first within one token): the ranking transformers'
    `generate_merges` gives, hence the same ids. Spaces become "▁" with no prefix (unless the file
    asks for one) and no pre-tokenizer (Gemma's own tokenizer.json)."""
    with _gc_paused():
        merges = _gemma_merges(tokens, vocab, merges_cache)
        try:
            model = models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
        except Exception as e:
            raise TokenizerError(f"GGUF tokenizer vocabulary cannot make a BPE model: {e}") from e
    backend = _Backend(model)
    escape = normalizers.Replace(" ", _SPM_SPACE)
    backend.normalizer = normalizers.Sequence([normalizers.Prepend(_SPM_SPACE), escape]) if add_prefix else escape
    steps = [decoders.Replace(_SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence([*steps, decoders.Strip(" ", 1, 0)] if add_prefix else steps)
    return backend


def _unk_piece(metadata: Mapping[str, Any], tokens: list[str]) -> str | None:
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
    return tokens[int(unk_id)] if unk_id is not None and 0 <= int(unk_id) < len(tokens) else None


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Python's cycle collector paused while 515k merge tuples are made and handed over: they hold
    only strings, yet each new batch would set off collections that walk all of them (~0.2 s)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _gemma_merges(tokens: list[str], vocab: dict[str, int], cache: Path | None) -> list[tuple[str, str]]:
    """Gemma's merges, from `cache` when it holds them, else derived (and written there)."""
    pairs = _read_merge_pairs(cache) if cache is not None else None
    if pairs is not None:
        try:
            return _merge_pieces(tokens, pairs)
        except IndexError:  # a damaged file naming a piece past the vocabulary: derive them again
            pass
    pairs = _gemma_merge_pairs(tokens, vocab)
    if cache is not None:
        _write_merge_pairs(cache, pairs)
    return _merge_pieces(tokens, pairs)


def _merge_pieces(tokens: list[str], pairs: array) -> list[tuple[str, str]]:
    # The pieces are the vocabulary's own string objects, looked up in C (map/zip): no new strings.
    return list(zip(map(tokens.__getitem__, pairs[0::2]), map(tokens.__getitem__, pairs[1::2])))


def _gemma_merge_pairs(tokens: list[str], vocab: dict[str, int]) -> array:
    """Gemma's merges as (left id, right id) pairs, flat, in rank order: every cut of every token
    into two known pieces (as transformers does: control pieces are matched whole before BPE
    anyway), by token position, the longer left piece first. One comprehension over the 1.2M cuts
    of 262k tokens (~0.8 s): what the cache saves."""
    get = vocab.get
    pairs = [(left, right) for t in tokens for cut in range(len(t) - 1, 0, -1)
             if (right := get(t[cut:])) is not None and (left := get(t[:cut])) is not None]
    return array("I", itertools.chain.from_iterable(pairs))


# A merges cache file: a uint32 count, then that many (left id, right id) uint32 pairs, in this
# machine's byte order (a file from another order fails the count check and is derived again).
_COUNT = struct.Struct("=I")


def _read_merge_pairs(path: Path) -> array | None:
    """The cached pairs, or None when the file is missing or its length disagrees with its count."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if len(data) < _COUNT.size or (len(data) - _COUNT.size) % 8:
        return None
    pairs = array("I", data[_COUNT.size :])
    return pairs if len(pairs) == 2 * _COUNT.unpack_from(data)[0] else None


def _write_merge_pairs(path: Path, pairs: array) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, _COUNT.pack(len(pairs) // 2) + pairs.tobytes())
    except OSError:
        pass  # a read-only store: the next load derives the merges again


def _text(value: Any) -> str:
    """A GGUF string, whichever way the metadata parser handed it over."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _merges(metadata: Mapping[str, Any]) -> list[tuple[str, str]]:
    merges = []
    raw = metadata.get("tokenizer.ggml.merges")
    for merge in raw if raw is not None else []:
        merge = _text(merge)
        left, sep, right = merge.partition(" ")
        if not sep:
            raise TokenizerError(f"GGUF merge {merge!r} is not two pieces separated by a space")
        merges.append((left, right))
    return merges


def _merges_from_scores(
    tokens: list[str], types: list[int], scores: list[float], vocab: dict[str, int]
) -> list[tuple[str, str]]:
    ranked = []
    for token, ty, score in zip(tokens, types, scores):
        if ty != _NORMAL:
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((-score, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for _, _, _, left, right in ranked]


def _bos_eos_template(backend: _Backend, bos_id: int | None, eos_id: int | None) -> processors.TemplateProcessing:
    def piece(i: int | None) -> list[str]:
        return [backend.id_to_token(i)] if i is not None else []

    special = [(backend.id_to_token(i), i) for i in (bos_id, eos_id) if i is not None]
    single = [*piece(bos_id), "$A", *piece(eos_id)]
    pair = [*single, *[f"{p}:1" for p in piece(bos_id)], "$B:1", *[f"{p}:1" for p in piece(eos_id)]]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(dict.fromkeys(special)))


# --- Hugging Face folder helpers ----------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TokenizerError(f"cannot read {path}: {e}") from e
    return data if isinstance(data, dict) else {}


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_chat_template(root: Path, config: Mapping[str, Any]) -> str | None:
    # transformers >= 4.43 saves the template as chat_template.jinja; older folders keep it in
    # tokenizer_config.json, either as a string or as a list of named templates.
    jinja_file = root / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if template is None:
        template = _read_json(root / "chat_template.json").get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    return template if isinstance(template, str) and template else None


# --- chat templates -----------------------------------------------------------------------------


def _checked_messages(messages: Any) -> list[dict[str, Any]]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TokenizerError(
            f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got {type(messages).__name__}"
        )
    checked = []
    for n, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TokenizerError(
                f"messages[{n}] must be a dict with 'role' and 'content', got {type(message).__name__}"
            )
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise TokenizerError(f"messages[{n}] needs a 'role' string (system, user, assistant, ...), got {role!r}")
        # An assistant turn that only calls tools may have no text, as in the OpenAI API.
        if not isinstance(content, str) and not (content is None and message.get("tool_calls")):
            raise TokenizerError(f"messages[{n}] needs a 'content' string, got {type(content).__name__}")
        checked.append(dict(message))
    return checked


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore names, so templates cannot plant dunders on it."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # same trick as jinja2's: `self` may be a kwarg
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks in
    transformers; for rendering it is a no-op, but templates that use it must still parse."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # jinja2's own tojson escapes <, >, & for HTML; chat templates want plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _Sandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox, but an unsafe attribute fails at once instead of rendering as ""."""

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise jinja2.exceptions.SecurityError(
            f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is not allowed"
        )


@functools.lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["namespace"] = _Namespace
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise TokenizerError(f"the model's chat template is not valid Jinja (line {e.lineno}): {e.message}") from e
