"""Training data: files -> documents -> token shards on disk -> batches of fixed-length windows.

Inputs are text files, folders of them (recursively, hidden files skipped) and JSONL files whose
lines are `{"text": "..."}` or `{"messages": [{"role": ..., "content": ...}, ...]}`. A text file is one
document, a JSONL line is one document. Input that is not UTF-8 text, a JSONL line that is not one of
those objects, or no text at all is an `LlmosError` naming the file (and line).

`prepare_data(paths, tokenizer, folder)` tokenizes every document once into memory-mapped shards:

    folder/train.bin, val.bin            token ids, uint16 (uint32 for vocabularies over 65535)
    folder/train.mask.bin, val.mask.bin  uint8, 1 where the token is a training target (chat data only)
    folder/meta.json                     dtype, token counts, and a fingerprint of inputs + tokenizer

Every document ends with EOS, which marks the boundary. For chat documents the loss mask covers the
assistant turns only (their text and the end-of-turn token the template writes after them): the
conversation is rendered turn by turn with the tokenizer's chat template and each assistant span is
tokenized separately, so the mask follows token boundaries exactly. Documents are split between
train and validation at random with a fixed seed; with too few documents for that, the last part of
the token stream is the validation split. A folder whose fingerprint matches is reused as is. With `progress=True` a bar on stderr
counts the bytes of input tokenized.

`Windows` cuts a split into non-overlapping windows of `seq_len + 1` tokens. The order of windows is
a pure function of (seed, position): window `pos` of the training stream is
`permutation(seed + epoch)[pos % n]`, so the data position saved in a checkpoint is one integer and
each distributed rank reads only the rows it trains on.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from llmos.errors import LlmosError
from llmos.files import json_lines
from llmos.tokenizer import Tokenizer, TokenizerError

JSONL_SUFFIXES = (".jsonl",)
_SNIFF = 8192
_FORMAT_VERSION = 1


@dataclass(frozen=True)
class Document:
    source: str  # "path" or "path:line", for error messages
    text: str | None = None
    messages: list[dict[str, Any]] | None = None


# --- reading ------------------------------------------------------------------------------------

def list_files(paths: Sequence[str | Path]) -> list[Path]:
    """The files named or found (recursively, sorted, hidden ones skipped) under `paths`."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise LlmosError("no training data given: pass text files, folders or JSONL files")
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            found = sorted(
                f for f in p.rglob("*")
                if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )
            if not found:
                raise LlmosError(f"{p} is an empty folder: put text (.txt, .md) or .jsonl files in it")
            files += found
        else:
            raise LlmosError(f"no such file or folder: {p}")
    return files


def iter_documents(paths: Sequence[str | Path], on_file: Callable[[Path], None] | None = None) -> Iterator[Document]:
    """Every document of every file, in order; raises LlmosError on the first bad one.
    `on_file(path)` is called once each file's documents have all been yielded (for progress)."""
    any_text = False
    for path in list_files(paths):
        reader = _read_jsonl if path.suffix.lower() in JSONL_SUFFIXES else _read_text
        for doc in reader(path):
            any_text = True
            yield doc
        if on_file is not None:
            on_file(path)
    if not any_text:
        raise LlmosError(f"no text found in {', '.join(map(str, paths))}: the files are empty")


def _decode(path: Path, raw: bytes) -> str:
    nul = raw.find(b"\x00", 0, _SNIFF)
    if nul >= 0:
        raise LlmosError(f"{path} looks binary (NUL byte at offset {nul}); llmos trains on UTF-8 text and JSONL files")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise LlmosError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                         "convert the file to UTF-8") from None


def _read_text(path: Path) -> Iterator[Document]:
    text = _decode(path, path.read_bytes())
    if text.strip():
        yield Document(str(path), text=text)


def _read_jsonl(path: Path) -> Iterator[Document]:
    for n, obj in json_lines(path, _decode(path, path.read_bytes())):
        where = f"{path}:{n}"
        if isinstance(obj, dict) and isinstance(obj.get("text"), str):
            if obj["text"].strip():
                yield Document(where, text=obj["text"])
        elif isinstance(obj, dict) and isinstance(obj.get("messages"), list):
            yield Document(where, messages=_check_messages(obj["messages"], where))
        else:
            raise LlmosError(f'{where}: expected {{"text": "..."}} or {{"messages": [...]}}, got {json.dumps(obj)[:80]}')


def _check_messages(messages: list[Any], where: str) -> list[dict[str, Any]]:
    if not messages:
        raise LlmosError(f"{where}: \"messages\" is empty")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise LlmosError(f'{where}: messages[{i}] must be {{"role": "...", "content": "..."}}, got {json.dumps(m)[:80]}')
    if not any(m["role"] == "assistant" for m in messages):
        raise LlmosError(f"{where}: the conversation has no assistant turn, so there is nothing to learn from it")
    return messages


# --- tokenizing ---------------------------------------------------------------------------------

def encode_document(doc: Document, tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """(ids, mask): the document's tokens ending with EOS, and 1 for tokens that are loss targets."""
    eos = tokenizer.eos_id
    if eos is None:
        raise LlmosError("the tokenizer has no EOS token, which marks document boundaries in training data")
    if doc.text is not None:
        ids = tokenizer.encode(doc.text, add_special_tokens=False) + [eos]
        return ids, [1] * len(ids)
    ids, mask = [], []
    for piece, trained in chat_segments(doc, tokenizer):
        part = tokenizer.encode(piece, add_special_tokens=False)
        ids += part
        mask += [int(trained)] * len(part)
    # ChatML-style templates end each turn with EOS and a newline: that already marks the boundary.
    ends_with_eos = bool(ids) and (ids[-1] == eos or (len(ids) > 1 and ids[-2] == eos
                                                      and not tokenizer.decode(ids[-1:]).strip()))
    if not ends_with_eos:
        ids.append(eos)
        mask.append(0)  # a boundary marker the template did not write is not the model's to predict
    return ids, mask


def chat_segments(doc: Document, tokenizer: Tokenizer) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is_assistant) pieces whose concatenation is the full render.

    Each assistant piece is what the assistant turn adds after the generation prompt; the rest
    (system, user, role headers) is context. Needs a template whose renders of successive message
    prefixes extend each other, which is true of ChatML, Llama 3 and most others.
    """
    messages = doc.messages or []

    def render(n: int, prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(messages[:n], add_generation_prompt=prompt)
        except TokenizerError as exc:
            raise LlmosError(f"{doc.source}: {exc}") from None

    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            head = render(i, True)
            full = render(i + 1, False)
            _check_prefix(done, head, doc.source)
            _check_prefix(head, full, doc.source)
            pieces += [(head[len(done):], False), (full[len(head):], True)]
        else:
            full = render(i + 1, False)
            _check_prefix(done, full, doc.source)
            pieces.append((full[len(done):], False))
        done = full
    return [(text, trained) for text, trained in pieces if text]


def _check_prefix(prefix: str, text: str, source: str) -> None:
    if not text.startswith(prefix):
        raise LlmosError(
            f"{source}: this model's chat template rewrites earlier turns as the conversation grows, "
            "so assistant tokens cannot be masked turn by turn; train on {\"text\": ...} lines instead"
        )


# --- shards -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shards:
    """A prepared dataset folder (see the module docstring)."""

    folder: Path
    dtype: str
    counts: dict[str, int]
    masked: bool

    @classmethod
    def open(cls, folder: str | Path) -> Shards:
        folder = Path(folder)
        try:
            meta = json.loads((folder / "meta.json").read_text())
            return cls(folder, meta["dtype"], {k: int(v) for k, v in meta["counts"].items()}, bool(meta["masked"]))
        except (OSError, ValueError, KeyError) as exc:
            raise LlmosError(f"{folder} is not a prepared data folder ({exc}); prepare it again from the text") from None

    def tokens(self, split: str) -> np.ndarray:
        return np.memmap(self.folder / f"{split}.bin", dtype=self.dtype, mode="r", shape=(self.counts[split],))

    def mask(self, split: str) -> np.ndarray | None:
        if not self.masked:
            return None
        return np.memmap(self.folder / f"{split}.mask.bin", dtype=np.uint8, mode="r", shape=(self.counts[split],))


def fingerprint(files: list[Path], tokenizer: Tokenizer, val_fraction: float, seed: int) -> str:
    h = hashlib.sha256(f"v{_FORMAT_VERSION} {val_fraction} {seed}".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()} {st.st_size} {st.st_mtime_ns}\n".encode())
    h.update(tokenizer.to_json().encode())  # same files, other tokenizer: other ids
    h.update(str(tokenizer.chat_template).encode())
    return h.hexdigest()


def prepare_data(
    paths: Sequence[str | Path],
    tokenizer: Tokenizer,
    folder: str | Path,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    min_tokens: int = 2,
    progress: bool = False,
) -> Shards:
    """Tokenize `paths` into shards in `folder` (reused when inputs and tokenizer are unchanged).

    `min_tokens` is what each split needs at least (one window: seq_len + 1); `progress` shows a bar
    on stderr counting the input bytes tokenized.
    """
    folder = Path(folder)
    files = list_files(paths)
    key = fingerprint(files, tokenizer, val_fraction, seed)
    try:
        if json.loads((folder / "meta.json").read_text()).get("fingerprint") == key:
            return Shards.open(folder)
    except (OSError, ValueError):
        pass
    folder.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    rng = random.Random(seed)
    spans: list[tuple[int, int, bool]] = []  # (start, end, chosen for validation) in the stream
    masked, total = False, 0
    bar = byte_bar(files, "tokenizing", progress)
    with bar, open(folder / "all.bin.tmp", "wb") as tok_f, open(folder / "all.mask.tmp", "wb") as mask_f:
        for doc in iter_documents(files, on_file=lambda f: bar.update(f.stat().st_size)):
            ids, mask = encode_document(doc, tokenizer)
            masked = masked or not all(mask)
            np.asarray(ids, dtype=dtype).tofile(tok_f)
            np.asarray(mask, dtype=np.uint8).tofile(mask_f)
            spans.append((total, total + len(ids), rng.random() < val_fraction))
            total += len(ids)
    stream = np.memmap(folder / "all.bin.tmp", dtype=dtype, mode="r", shape=(total,))
    mask_stream = np.memmap(folder / "all.mask.tmp", dtype=np.uint8, mode="r", shape=(total,))
    if total < 2 * min_tokens:
        raise LlmosError(
            f"too little data: {', '.join(map(str, paths))} gives {total} tokens, and training needs at least "
            f"{2 * min_tokens} (one window of the sequence length for training and one for validation)"
        )
    val_spans = [(a, b) for a, b, v in spans if v]
    val_tokens = sum(b - a for a, b in val_spans)
    if len(val_spans) < 2 or val_tokens < min_tokens or total - val_tokens < min_tokens:
        # Too few documents for a split by document: validate on the end of the stream instead.
        cut = total - max(int(total * val_fraction), min_tokens)
        train_spans, val_spans = [(0, cut)], [(cut, total)]
    else:
        train_spans = [(a, b) for a, b, v in spans if not v]
    counts = {}
    for split, split_spans in (("train", train_spans), ("val", val_spans)):
        counts[split] = _write_split(folder, split, split_spans, stream, mask_stream if masked else None)
    del stream, mask_stream
    os.remove(folder / "all.bin.tmp")
    os.remove(folder / "all.mask.tmp")
    meta = {"fingerprint": key, "dtype": np.dtype(dtype).name, "counts": counts, "masked": masked,
            "vocab_size": tokenizer.vocab_size, "files": [str(f) for f in files], "documents": len(spans)}
    tmp = folder / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, folder / "meta.json")  # written last: the folder is complete once it exists
    return Shards.open(folder)


def byte_bar(files: list[Path], what: str, progress: bool) -> tqdm:
    """A bar on stderr counting the bytes of `files` as they are read (on a terminal or not)."""
    total = sum(f.stat().st_size for f in files)
    return tqdm(total=total, desc=what, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                disable=not progress, dynamic_ncols=True)


def _write_split(folder: Path, split: str, spans: list[tuple[int, int]], stream: np.ndarray,
                 mask: np.ndarray | None) -> int:
    n = 0
    with open(folder / f"{split}.bin", "wb") as tok_f:
        for a, b in spans:
            stream[a:b].tofile(tok_f)
            n += b - a
    if mask is not None:
        with open(folder / f"{split}.mask.bin", "wb") as mask_f:
            for a, b in spans:
                mask[a:b].tofile(mask_f)
    return n


# --- windows and batches ------------------------------------------------------------------------

class Windows:
    """Non-overlapping windows of `seq_len + 1` tokens over one split, in a seeded order."""

    def __init__(self, tokens: np.ndarray, mask: np.ndarray | None, seq_len: int, seed: int = 0) -> None:
        self.tokens, self.mask, self.seq_len, self.seed = tokens, mask, seq_len, seed
        self.n = (len(tokens) - 1) // seq_len
        if self.n < 1:
            raise LlmosError(f"the data has {len(tokens)} tokens, fewer than one window of {seq_len + 1}; "
                             "add data or lower --seq-len")
        self._perm: tuple[int, torch.Tensor] | None = None

    def index(self, pos: int) -> int:
        """Window number of stream position `pos`: a fresh seeded permutation each epoch."""
        epoch, i = divmod(pos, self.n)
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        return int(self._perm[1][i])

    def rows(self, windows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(inputs (B, T), targets (B, T), loss weights (B, T) float) for window numbers `windows`."""
        T = self.seq_len
        chunks = np.stack([np.asarray(self.tokens[w * T : w * T + T + 1], dtype=np.int64) for w in windows])
        x = torch.from_numpy(chunks[:, :-1])  # (B, T)
        y = torch.from_numpy(chunks[:, 1:])  # (B, T)
        if self.mask is None:
            m = torch.ones(y.shape)
        else:
            m = torch.from_numpy(np.stack([np.asarray(self.mask[w * T + 1 : w * T + T + 1], dtype=np.float32) for w in windows]))
        return x, y, m

    def batch(self, start: int, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows for stream positions start .. start + size - 1 in the seeded order."""
        return self.rows([self.index(p) for p in range(start, start + size)])
