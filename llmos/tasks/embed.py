"""Sentence embeddings with llmos's own BERT-family encoder.

    embedder = Embedder.load()                       # all-minilm-l6-v2, pulled on first use
    out = embedder.embed(["first text", "second"])   # out.vectors: (N, D) float32 numpy
    out.truncated                                    # indices of inputs cut to embedder.max_tokens

A model is a Hugging Face BERT folder (config.json, *.safetensors, tokenizer.json). When it carries a
sentence-transformers configuration, it is followed exactly: `sentence_bert_config.json` sets the
maximum sequence length (256 for all-MiniLM-L6-v2, though the model has 512 positions), the Pooling
module's config sets the pooling (mean, CLS, max or mean/sqrt(len)), and a Normalize module in
`modules.json` makes vectors unit length. A plain BERT folder gets mean pooling, unnormalized, as
sentence-transformers gives it.

Contract: inputs longer than `max_tokens` (special tokens included) are truncated as
sentence-transformers truncates them, and the result says which ones were (`Embeddings.truncated`):
truncation is reported, never silent. Inputs are tokenized together (the `tokenizers` library, in
Rust, off the GIL), sorted by length and batched; the encoder computes only the real tokens of a
batch (models/bert.py packs them), so the order and company of a text do not change its vector
beyond float rounding. The output rows are in input order.

Forms (`Embedder.load(dtype=...)`): "fp32"; "bf16" (bf16 weights and activations: the many-row
matmuls run ~2.5-3x faster on CPUs with AVX-512 BF16); "auto", the fastest form whose vectors keep cosine >= 0.999 with fp32 on every
text of a fixed check set (llmos/data/embed_check.jsonl), measured once per model and cached in
the store under quality/.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmos import store
from llmos.engine import native
from llmos.errors import LlmosError
from llmos.files import write_atomically
from llmos.models.bert import Packing
from llmos.tokenizer import Tokenizer
from llmos.weights import loader

POOLING_MODES = ("mean", "cls", "max", "mean_sqrt_len")
# Fastest first, for many rows on a CPU (bench/embed.py): auto takes the first that passes. int8 (fbgemm's
# dynamic linear: int8 weights, activations quantized on the fly) was measured and left out: 1.2x bf16's
# speed, but min cosine 0.91 with fp32 on the check set (BERT's outlier activations), and a text's
# vector depended on its batch (one activation scale per matmul input).
FORMS = ("bf16", "fp32")
DTYPES = (*FORMS, "auto")
MIN_COSINE = 0.999  # a form's vectors against fp32's, on every text of the check set


@dataclass(frozen=True)
class Embeddings:
    """The result of `Embedder.embed`: one row per input, in input order."""

    vectors: np.ndarray  # (N, D) float32
    n_tokens: list[int]  # tokens per input before truncation, special tokens included
    truncated: list[int]  # indices of inputs cut to the model's maximum length

    def __len__(self) -> int:
        return len(self.vectors)


@dataclass(frozen=True)
class PoolingConfig:
    mode: str = "mean"
    normalize: bool = False
    max_tokens: int | None = None  # sentence-transformers' max_seq_length, when the folder has one


def read_pooling_config(folder: Path) -> PoolingConfig:
    """Pooling, normalization and maximum length from a sentence-transformers folder's files."""
    modules = _json(folder / "modules.json") or []
    pooling_dir, normalize = "1_Pooling", False
    for module in modules if isinstance(modules, list) else []:
        kind = str(module.get("type", ""))
        if kind.endswith(".Pooling"):
            pooling_dir = module.get("path") or pooling_dir
        elif kind.endswith(".Normalize"):
            normalize = True
        elif kind.endswith((".Dense", ".LayerNorm", ".WordEmbeddings", ".CNN", ".LSTM")):
            raise LlmosError(f"{folder}: sentence-transformers module {kind} is not supported (Transformer, Pooling and Normalize are)")
    pooling = _json(folder / pooling_dir / "config.json") or {}
    mode = "mean"
    if pooling:
        chosen = [m for m in POOLING_MODES if pooling.get(f"pooling_mode_{m}_token" if m == "cls" else f"pooling_mode_{m}_tokens")]
        if len(chosen) != 1:
            raise LlmosError(f"{folder / pooling_dir}: exactly one pooling mode must be on ({', '.join(POOLING_MODES)}), got {chosen or 'none'}")
        mode = chosen[0]
    sbert = _json(folder / "sentence_bert_config.json") or {}
    max_len = sbert.get("max_seq_length")
    return PoolingConfig(mode=mode, normalize=normalize, max_tokens=int(max_len) if max_len else None)


def _json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise LlmosError(f"{path} is not valid JSON ({exc})") from exc


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Sentence vectors (B, C) from hidden states (B, T, C) over the real tokens (mask (B, T))."""
    m = mask.to(hidden.dtype)[..., None]  # (B, T, 1)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return hidden.masked_fill(m == 0, float("-inf")).amax(dim=1)
    summed, counts = (hidden * m).sum(dim=1), m.sum(dim=1).clamp(min=1e-9)
    return summed / counts if mode == "mean" else summed / counts.sqrt()


class Embedder:
    """A sentence-embedding model: `embed(texts) -> Embeddings`, `embed_query(text) -> (D,)`.

    `name` is what it was loaded as (a store name or a path); `fingerprint` identifies its weights
    and configuration, so an index can refuse vectors from another model.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, pooling: PoolingConfig, *,
                 name: str, path: Path, fingerprint: str) -> None:
        self.model, self.tokenizer, self.pooling = model, tokenizer, pooling
        self.name, self.path, self.fingerprint = name, path, fingerprint
        limit = model.config.max_seq_len
        self.max_tokens: int = min(pooling.max_tokens or limit, limit)
        self.dim: int = model.config.dim
        self.pad_id: int = tokenizer.pad_id if tokenizer.pad_id is not None else 0
        # Special tokens `encode` puts after a text ([SEP] for BERT): truncation keeps them.
        self.n_suffix: int = _suffix_length(tokenizer)
        self.form: str = "bf16" if next(model.parameters()).dtype == torch.bfloat16 else "fp32"
        # Whether the forward runs as one C++ call without the GIL (engine/native.py `encoder_forward`;
        # None until the first batch asks): a query embedding can then run beside other Python work.
        self.native: bool | None = None

    @classmethod
    def load(cls, name_or_path: str | Path = store.DEFAULT_EMBED_MODEL, dtype: str = "fp32") -> Embedder:
        """`dtype`: a form ("fp32", "bf16") or "auto" (see the module docstring)."""
        if dtype not in DTYPES:
            raise LlmosError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        path = store.resolve(str(name_or_path))
        if store.kind_of(path) == "gguf":
            raise LlmosError(f"{path} is a GGUF file; embedding models are loaded from Hugging Face folders (config.json, *.safetensors, tokenizer.json)")
        config = loader.read_config(path)
        if config.arch != "bert":
            raise LlmosError(f"{path} is a {config.arch} model; embeddings need a BERT-family encoder such as {store.DEFAULT_EMBED_MODEL}")
        pooling = read_pooling_config(path)
        fingerprint = _fingerprint(path)
        if dtype == "auto":
            dtype = auto_form(path, fingerprint)
        model, _, tokenizer = loader.load_model(path, dtype)
        embedder = cls(model, tokenizer, pooling, name=str(name_or_path), path=path, fingerprint=fingerprint)
        embedder.form = dtype
        return embedder

    def count_tokens(self, text: str) -> int:
        """Tokens `text` takes as one input, special tokens included (compare with `max_tokens`)."""
        return len(self.tokenizer.encode(text))

    def _encode_all(self, texts: Sequence[str]) -> list[list[int]]:
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise LlmosError(f"texts must be strings; item {i} is a {type(text).__name__}")
        try:  # one call: the Rust side tokenizes in parallel, without the GIL
            return [e.ids for e in self.tokenizer.backend.encode_batch(list(texts), add_special_tokens=True)]
        except TypeError:  # invalid Unicode somewhere: the one-text path says which and where
            return [self.tokenizer.encode(t) for t in texts]

    def embed(self, texts: str | Sequence[str], batch_size: int = 32, *, threads: int = 0) -> Embeddings:
        """Embed `texts` (a str is one text) in length-sorted batches of `batch_size` (`threads`: as
        `embed_query`)."""
        if isinstance(texts, str):
            texts = [texts]
        if batch_size < 1:
            raise LlmosError(f"batch_size must be at least 1, got {batch_size}")
        ids, n_tokens, truncated = [], [], []
        for i, row in enumerate(self._encode_all(texts)):
            n_tokens.append(len(row))
            if len(row) > self.max_tokens:
                # As transformers truncates: keep the first tokens and the closing special token(s).
                tail = row[len(row) - self.n_suffix:] if self.n_suffix else []
                row = row[: self.max_tokens - len(tail)] + tail
                truncated.append(i)
            ids.append(row)
        vectors = np.zeros((len(ids), self.dim), dtype=np.float32)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            rows = [ids[i] for i in batch]
            vectors[batch] = self._embed_ids(rows, threads)
            if sum(map(len, rows)) >= TRIM_TOKENS:
                give_back_freed_memory()
        return Embeddings(vectors=vectors, n_tokens=n_tokens, truncated=truncated)

    def embed_query(self, text: str, threads: int = 0) -> np.ndarray:
        """One text's vector (D,) float32; an error, not a truncation, for an empty query. `threads` > 0:
        the forward runs on that many threads (of the calling thread's own setting; see `native`)."""
        if not text.strip():
            raise LlmosError("the query is empty")
        return self.embed([text], threads=threads).vectors[0]

    @torch.inference_mode()
    def _embed_ids(self, rows: list[list[int]], threads: int = 0) -> np.ndarray:
        n = len(rows)
        if self.form == "bf16":  # filler rows bring the packed row count to one of few sizes (see `row_bucket`)
            total = sum(map(len, rows))
            gap = row_bucket(total) - total
            width = max(map(len, rows))  # no filler row longer than the batch's texts: the padded (B, T) stays as wide
            rows = rows + [[self.pad_id] * min(gap - i, width) for i in range(0, gap, width)]
        lengths = np.array([len(r) for r in rows])
        T = int(lengths.max())
        mask = torch.from_numpy(np.arange(T)[None, :] < lengths[:, None])  # (B, T)
        tokens = torch.full((len(rows), T), self.pad_id, dtype=torch.long)  # (B, T)
        tokens[mask] = torch.from_numpy(np.fromiter((t for r in rows for t in r), dtype=np.int64, count=int(lengths.sum())))
        packing = Packing.of(mask)
        packed = native.encoder_forward(self.model, tokens, packing, threads) if self.native is not False else None
        if self.native is None:  # asked once: the extension is built (or not) for the process
            self.native = packed is not None
        if packed is None:
            packed = self.model.forward_packed(tokens, packing)
        hidden = packing.pad(packed.float())  # (B, T, C), zeros at padding
        out = pool(hidden, mask, self.pooling.mode)
        if self.pooling.normalize:
            out = torch.nn.functional.normalize(out, p=2, dim=-1)
        return out[:n].numpy()

    def __repr__(self) -> str:
        return f"Embedder({self.name!r}, dim={self.dim}, max_tokens={self.max_tokens}, pooling={self.pooling.mode}, form={self.form})"


# --- forms ---------------------------------------------------------------------------------------


TRIM_TOKENS = 2048  # a batch of at least this many tokens gives its freed heap back (`give_back_freed_memory`)


def row_bucket(n: int) -> int:
    """The packed row count a bf16 batch of `n` real tokens runs at: n rounded up to a multiple of 8
    up to 64, then to a quarter of its power of two (at most a quarter more rows, 4 sizes an octave).

    oneDNN's bf16 matmul keeps ~1.2 MB for every row count it has run, even with its primitive cache
    off (measured: 800 random row counts x the encoder's 4 weight shapes grew RSS by 1.8 GB), and
    packed batches of real tokens have a new count nearly every time: ingesting 10 MB peaked 557 MB
    above 1 MB. With rows rounded to these sizes the kept memory stops growing after a few dozen, so
    oneDNN's primitive cache can stay on (it was turned off to bound the growth): a query embeds in
    ~9 ms instead of ~13 (bf16, 1 thread), and a 3 MB ingestion plateaus at ~403 MB against ~396."""
    if n <= 64:
        return max(8, -(-n // 8) * 8)
    step = (1 << (n.bit_length() - 1)) // 4
    return -(-n // step) * step


def give_back_freed_memory() -> None:
    """Return the heap pages freed by the last embedding batch to the system (glibc's malloc_trim).

    glibc keeps them for reuse, and over batches of varying shapes the kept heap grew with the input:
    embedding 256 chunks peaked ~450 MB above the loaded model; with a trim after each batch of 32,
    ~250 MB. A no-op where the C library has no malloc_trim."""
    global _LIBC
    if _LIBC is None:
        import ctypes

        try:
            _LIBC = ctypes.CDLL(None)  # the process's own C library
            _LIBC.malloc_trim  # noqa: B018 - glibc only
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC: Any = None


def check_texts() -> list[str]:
    """The fixed check set the forms are measured on: short and long, many scripts, one truncated."""
    from importlib import resources

    lines = resources.files("llmos.data").joinpath("embed_check.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def form_cosines(path: Path, forms: Sequence[str] = FORMS) -> dict[str, dict[str, float]]:
    """Each form's min and mean cosine with fp32 over the check set."""
    texts = check_texts()
    reference = Embedder.load(path, "fp32").embed(texts).vectors
    unit = reference / np.maximum(np.linalg.norm(reference, axis=1, keepdims=True), 1e-12)
    out = {}
    for form in forms:
        v = reference if form == "fp32" else Embedder.load(path, form).embed(texts).vectors
        cos = (v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12) * unit).sum(axis=1)
        out[form] = {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()), "passes": bool(cos.min() >= MIN_COSINE)}
    return out


def auto_form(path: Path, fingerprint: str) -> str:
    """The fastest form that passes (measured once per model: ~10 s; cached in the store)."""
    cache = store.home() / "quality" / f"embed-{fingerprint}.json"
    try:
        return json.loads(cache.read_text())["auto"]
    except (OSError, ValueError, KeyError):
        pass
    print(f"llmos: first load of {path} with dtype='auto': measuring each form against fp32 (once per model)",
          file=sys.stderr, flush=True)
    result: dict[str, Any] = form_cosines(path)
    result["auto"] = next(f for f in FORMS if result[f]["passes"])
    cache.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(cache, json.dumps(result, indent=2))
    return result["auto"]


def _suffix_length(tokenizer: Tokenizer) -> int:
    plain, full = tokenizer.encode("a", add_special_tokens=False), tokenizer.encode("a")
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return len(full) - start - len(plain)
    return 0


def _fingerprint(folder: Path) -> str:
    """A short hash of what decides the vectors: config files and the weights' size and header."""
    digest = hashlib.sha256()
    for name in ("config.json", "tokenizer.json", "modules.json", "sentence_bert_config.json", "1_Pooling/config.json"):
        path = folder / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes())
    for weights in sorted(folder.glob("*.safetensors")):
        with open(weights, "rb") as f:
            digest.update(weights.name.encode() + str(weights.stat().st_size).encode() + f.read(1 << 16))
    return digest.hexdigest()[:16]
