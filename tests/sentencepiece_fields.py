"""SentencePiece-shaped GGUF tokenizer metadata, trained here in milliseconds so tests need no download:
`llama()` as Llama 2 / Mistral files hold it (pieces best-first with score = -rank, a space prefix), and
`gemma()` as Gemma's do (no merges, no prefix, runs of spaces spelled with real spaces)."""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers, trainers

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, hello there, hello again and again.",
    "Tokenizers turn text into numbers and numbers back into text.",
    "A café in Zürich serves crème brûlée at half past nine.",
] * 20


def _pieces(vocab_size: int, prepend_scheme: str) -> list[str]:
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=prepend_scheme)
    trained.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False))
    return [p for p, _ in sorted(trained.get_vocab().items(), key=lambda kv: kv[1]) if p != "<unk>"]


def llama() -> dict:
    """unk, bos, eos, 256 byte pieces, then pieces best-first with score = -rank."""
    pieces = _pieces(200, "always")
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces]
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [2, 3, 3, *[6] * 256, *[1] * len(pieces)],
        "tokenizer.ggml.scores": [0.0] * 259 + [-float(rank) for rank in range(len(pieces))],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }


def gemma() -> dict:
    """pad, eos, bos, unk, two turn markers, 256 byte pieces, runs of real spaces (user-defined, as
    Gemma's files spell them), then trained pieces in merge order; no merges, no space prefix."""
    pieces = _pieces(300, "never")
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    tokens = [*specials, *(f"<0x{b:02X}>" for b in range(256)), "  ", "   ", *pieces]
    return {
        "general.architecture": "gemma3",
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3, 3, 3, 2, 3, 3, *[6] * 256, 4, 4, *[1] * len(pieces)],
        "tokenizer.ggml.scores": [0.0] * len(tokens),  # Gemma's scores do not rank its merges; unused
        "tokenizer.ggml.bos_token_id": 2,
        "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.unknown_token_id": 3,
        "tokenizer.ggml.add_space_prefix": False,
    }
