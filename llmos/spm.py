"""SentencePiece BPE encoded from the vocabulary alone, for Gemma's GGUF files (which carry no merges).

Gemma's merges are implicit in its vocabulary: two adjacent symbols merge when their concatenation is a
piece, and the merge that goes first is the one whose concatenation comes first in the vocabulary (for
two cuts of one piece, the longer left part first). That is the ranking `Tokenizer.from_gguf` derives
as 515k explicit merges for the `tokenizers` library (~0.5 s to build), and transformers' GGUF converter
gives; `SentencePieceBPE` applies it straight from the vocabulary dict, so it costs nothing to build.

Contract: `encode` and `decode` give what the `tokenizers` backend built from the same vocabulary gives
(the tests compare them on Gemma's real vocabulary):
- added tokens (control and user-defined) are matched whole in the raw text, leftmost-longest; with
  `split_special=False` a control token's spelling is left in the text (tokenizers'
  `encode_special_tokens`);
- the text between them has its spaces written "▁" (and one "▁" put before it with `add_prefix`);
- each character is its piece, or else the <0xNN> pieces of its UTF-8 bytes, or else the unknown piece
  (runs of unknown characters fused into one);
- the adjacent pair of lowest rank merges first, the leftmost among equals (tokenizers'
  `Word::merge_all`), until no pair's concatenation is a piece.
The text is cut into words before every "▁" that no piece has just after the character before it: no
merge can cross such a cut, so words are merged (and cached) one by one with the same result.
"""

from __future__ import annotations

import functools
import heapq
import re
from collections.abc import Iterable, Iterator, Sequence

_SPACE = "\u2581"  # SentencePiece writes spaces as "▁"
_WORDS = re.compile(f"{_SPACE}*[^{_SPACE}]+|{_SPACE}+")  # a run of "▁" and what follows it up to the next
_CACHE_SIZE = 1 << 16  # words whose ids are kept; the cache starts over when full
_CACHED_LENGTH = 256  # longer words (a paragraph of Chinese) rarely come again: not kept


class SentencePieceBPE:
    """Text <-> ids for a SentencePiece BPE vocabulary ranked by piece order (see the module header).

    `pieces[i]` is the spelling of id `i`; `vocab` maps a spelling to its id (for a repeated spelling,
    its last id, as the merges rank it); `unk` is the piece for characters with neither a piece nor
    byte pieces (None: they are dropped). `added` are the pieces matched whole in the text, `special`
    the ones among them that `decode(..., skip_special_tokens=True)` drops; `bos_id`/`eos_id` are put
    around the ids by `encode(..., add_special_tokens=True)`.
    """

    def __init__(
        self,
        pieces: Sequence[str],
        vocab: dict[str, int],
        *,
        unk: str | None = None,
        add_prefix: bool = False,
        added: Iterable[str] = (),
        special: Iterable[str] = (),
        bos_id: int | None = None,
        eos_id: int | None = None,
    ) -> None:
        self._pieces = pieces
        self._vocab = vocab
        self._unk = vocab[unk] if unk is not None else None
        self._add_prefix = add_prefix
        self._added = {t: vocab[t] for t in added}
        self.special = frozenset(special)
        self._special_ids = frozenset(vocab[t] for t in self.special)
        self._bos = [bos_id] if bos_id is not None else []
        self._eos = [eos_id] if eos_id is not None else []
        self._bytes = [vocab.get(f"<0x{b:02X}>") for b in range(256)]
        self._cache: dict[str, list[int]] = {}
        # A spelling repeated in the vocabulary leaves its earlier ids without a token, as in tokenizers.
        self.vocab_size = len(vocab)
        self._holes = frozenset() if len(vocab) == len(pieces) else frozenset(range(len(pieces))) - set(vocab.values())

    def id_to_token(self, i: int) -> str | None:
        """The piece of id `i`, or None (outside the vocabulary, or an earlier id of a repeated piece)."""
        return self._pieces[i] if 0 <= i < len(self._pieces) and i not in self._holes else None

    def token_to_id(self, piece: str) -> int | None:
        """The id of `piece`, or None when the vocabulary lacks it."""
        return self._vocab.get(piece)

    # --- encode ---------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True, split_special: bool = True) -> list[int]:
        """Ids of `text`; BOS/EOS around them with `add_special_tokens`. `split_special=False` encodes a
        control token's spelling as ordinary text."""
        ids = self._bos[:] if add_special_tokens else []
        for piece, token_id in self._split_added(text, split_special):
            if token_id is not None:
                ids.append(token_id)
            else:
                ids += self._encode_text(piece)
        if add_special_tokens:
            ids += self._eos
        return ids

    def _split_added(self, text: str, split_special: bool) -> Iterator[tuple[str, int | None]]:
        """The text cut around its added tokens: (text, None) and (token, id) in order."""
        start = at = 0
        while (found := self._added_start.search(text, at)) is not None:
            p = found.start()
            lengths = self._added_lengths[text[p]]
            token = next((s for n in lengths if (s := text[p : p + n]) in self._added), None)
            if token is None:
                at = p + 1
                continue
            at = p + len(token)
            if not split_special and token in self.special:
                continue  # left in the text; matching goes on after it, as in tokenizers
            if start < p:
                yield text[start:p], None
            yield token, self._added[token]
            start = at
        if start < len(text):
            yield text[start:], None

    @functools.cached_property
    def _added_start(self) -> re.Pattern[str]:
        """A character that starts an added token (a pattern that never matches when there are none)."""
        firsts = sorted({t[0] for t in self._added if t})
        return re.compile(f"[{''.join(map(re.escape, firsts))}]" if firsts else "(?!)")

    @functools.cached_property
    def _added_lengths(self) -> dict[str, list[int]]:
        """First character -> the lengths of the added tokens starting with it, longest first."""
        lengths: dict[str, set[int]] = {}
        for t in self._added:
            if t:
                lengths.setdefault(t[0], set()).add(len(t))
        return {c: sorted(ns, reverse=True) for c, ns in lengths.items()}

    def _encode_text(self, text: str) -> list[int]:
        text = text.replace(" ", _SPACE)
        if self._add_prefix:
            text = _SPACE + text
        if _SPACE not in self._vocab:
            return self._merge(text)
        ids: list[int] = []
        cache, glue, vocab = self._cache, self._glue, self._vocab
        words = _WORDS.findall(text)
        word = words[0] if words else ""
        for following in words[1:]:
            last = word[-1]
            # A piece with this character before "▁" (or a byte or unknown piece standing for it) could
            # merge across the cut: keep the words together.
            if last in glue or last not in vocab:
                word += following
                continue
            ids += cache.get(word) or self._merge_cached(word)
            word = following
        if word:
            ids += cache.get(word) or self._merge_cached(word)
        return ids

    @functools.cached_property
    def _glue(self) -> frozenset[str]:
        """The characters some piece has just before a "▁" (Gemma: only ">"; the "\\0" that separates
        the pieces here may add itself, which only keeps more words together). ~30 ms, on first use."""
        return frozenset(re.findall(f"([^{_SPACE}])(?={_SPACE})", "\0".join(self._pieces)))

    def _merge_cached(self, word: str) -> list[int]:
        ids = self._merge(word)
        if len(word) < _CACHED_LENGTH:
            if len(self._cache) >= _CACHE_SIZE:
                self._cache.clear()
            self._cache[word] = ids
        return ids

    def _merge(self, word: str) -> list[int]:
        """BPE over one word: a heap of the mergeable pairs over a linked list of symbols.

        A pair's rank is (id of the joined piece, minus the length of its left part), and the heap
        orders pairs by rank, then position. Both go into one int key, which Python compares faster
        than tuples: (joined * width + width - 1 - len(left)) * n + position, where n is the number of
        symbols and no left part is as long as `width`. An entry whose pair has changed since it was
        pushed (its key is no longer `key[position]`) is skipped.
        """
        vocab = self._vocab
        ids = list(map(vocab.get, word))
        if None in ids:
            symbols, ids = self._fallback(word)
        else:
            symbols = list(word)
        n = len(ids)
        if n < 2:
            return ids
        width = sum(map(len, symbols)) + 1
        get = vocab.get
        nxt = [*range(1, n), -1]
        prev = list(range(-1, n - 1))
        key = [-1] * n  # heap key of the pair that symbol i starts; -1: it starts none
        heap = []
        for i in range(n - 1):
            left = symbols[i]
            joined = get(left + symbols[i + 1])
            if joined is not None:
                key[i] = k = (joined * width + width - 1 - len(left)) * n + i
                heap.append(k)
        heapq.heapify(heap)
        pop, push = heapq.heappop, heapq.heappush
        while heap:
            k = pop(heap)
            i = k % n
            if key[i] != k:
                continue
            j = nxt[i]  # merge symbol j into symbol i
            left = symbols[i] = symbols[i] + symbols[j]
            ids[i], ids[j], key[j] = k // n // width, None, -1
            j = nxt[i] = nxt[j]
            key[i] = -1
            if j != -1:  # the pair this symbol now starts
                prev[j] = i
                joined = get(left + symbols[j])
                if joined is not None:
                    key[i] = k = (joined * width + width - 1 - len(left)) * n + i
                    push(heap, k)
            h = prev[i]
            if h != -1:  # the pair the symbol before now starts
                key[h] = -1
                joined = get(symbols[h] + left)
                if joined is not None:
                    key[h] = k = (joined * width + width - 1 - len(symbols[h])) * n + h
                    push(heap, k)
        return [i for i in ids if i is not None]

    def _fallback(self, word: str) -> tuple[list[str], list[int]]:
        """The first symbols of a word with characters outside the vocabulary: their UTF-8 bytes'
        pieces when the vocabulary has them all, else the unknown piece, one for a run of unknowns."""
        vocab, pieces = self._vocab, self._pieces
        ids: list[int] = []
        unknown = False  # an unknown piece is pending
        for c in word:
            i = vocab.get(c)
            if i is not None:
                if unknown:
                    ids.append(self._unk)
                    unknown = False
                ids.append(i)
                continue
            byte_ids = [self._bytes[b] for b in c.encode("utf-8")]
            if None not in byte_ids:
                # tokenizers adds them before a pending unknown piece, not after it: kept as it is.
                ids += byte_ids
            elif self._unk is not None:
                unknown = True
        if unknown:
            ids.append(self._unk)
        return [pieces[i] for i in ids], ids

    # --- decode ---------------------------------------------------------------------------------

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids` as tokenizers' decoders Replace("▁", " "), ByteFallback, Fuse and (with
        `add_prefix`) Strip(" ", 1, 0) give it: a run of byte pieces that is not valid UTF-8 gives one
        U+FFFD per byte."""
        out: list[str] = []
        run = bytearray()
        pieces, holes, special = self._pieces, self._holes, self._special_ids
        for i in ids:
            if i in holes or (skip_special_tokens and i in special):
                continue
            piece = pieces[i]
            if (byte := _byte_of(piece)) is not None:
                run.append(byte)
                continue
            if run:
                out.append(_utf8(run))
                run.clear()
            out.append(piece.replace(_SPACE, " "))
        if run:
            out.append(_utf8(run))
        text = "".join(out)
        return text[1:] if self._add_prefix and text.startswith(" ") else text


_BYTE_PIECE = re.compile(r"<0x(\+?[0-9A-Fa-f]+)>")  # 6 characters; the digits as Rust's u8::from_str_radix reads them


def _byte_of(piece: str) -> int | None:
    """The byte a "<0xNN>" piece stands for, as tokenizers' ByteFallback decoder reads it."""
    if len(piece) != 6 or not piece.startswith("<0x") or (match := _BYTE_PIECE.fullmatch(piece)) is None:
        return None
    return int(match.group(1), 16)


def _utf8(data: bytearray) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * len(data)
