"""Train a byte-level BPE tokenizer on text files with the `tokenizers` library.

Contract: `train_tokenizer(paths, vocab_size, out)` reads the same documents the data pipeline does
(text files, folders, JSONL with "text" or "messages"), learns a GPT-2-style byte-level BPE (every
byte is a token, so any text encodes), and writes a `tokenizer.json` whose first ids are the special
tokens a chat template needs: 0 `<|endoftext|>` (BOS/EOS, document separator), 1 `<|im_start|>`,
2 `<|im_end|>` (ChatML turns). `load_tokenizer(path)` turns such a file, or any Hugging Face
tokenizer folder, into an llmos `Tokenizer` with those ids and a ChatML template.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from tokenizers import Tokenizer as _Backend
from tokenizers import decoders, models, pre_tokenizers, trainers

from llmos.errors import LlmosError
from llmos.tokenizer import Tokenizer

EOT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (EOT, IM_START, IM_END)
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_tokenizer(
    paths: Sequence[str | Path], vocab_size: int, out: str | Path | None = None, min_frequency: int = 2,
    progress: bool = False,
) -> Tokenizer:
    """Learn a byte-level BPE of at most `vocab_size` ids (specials included); write it to `out`.
    `progress` shows a bar on stderr counting the input bytes read."""
    from llmos.train.data import byte_bar, iter_documents, list_files

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise LlmosError(f"vocabulary size must be at least {256 + len(SPECIAL_TOKENS)} (256 bytes + specials), got {vocab_size}")
    backend = _Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, even unseen ones
        show_progress=False,
    )

    files = list_files(paths)
    bar = byte_bar(files, f"learning a {vocab_size}-token tokenizer", progress)

    def texts() -> Iterator[str]:
        for doc in iter_documents(files, on_file=lambda f: bar.update(f.stat().st_size)):
            if doc.text is not None:
                yield doc.text
            else:  # chat data: the turns' text, so their words get merges too
                yield from (m["content"] for m in doc.messages if isinstance(m.get("content"), str))

    with bar:  # the merges are computed after the last file is read, while the bar stays at 100%
        backend.train_from_iterator(texts(), trainer=trainer)
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        backend.save(str(out))
    return _wrap(backend)


def _wrap(backend: _Backend) -> Tokenizer:
    ids = {t: backend.token_to_id(t) for t in SPECIAL_TOKENS}
    if ids[EOT] is None:
        raise LlmosError(f"this tokenizer has no {EOT} token; train it with `llmos tokenizer train`")
    chat = ids[IM_START] is not None and ids[IM_END] is not None
    stops = frozenset(i for i in (ids[EOT], ids[IM_END]) if i is not None)
    return Tokenizer(
        backend,
        bos_id=ids[EOT],
        eos_id=ids[EOT],
        pad_id=ids[EOT],
        stop_ids=stops,
        special_ids=frozenset(i for i in ids.values() if i is not None),
        chat_template=CHATML_TEMPLATE if chat else None,
    )


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer.json written by `train_tokenizer`, or a Hugging Face tokenizer folder."""
    path = Path(path)
    if path.is_dir():
        return Tokenizer.from_dir(path)
    if not path.is_file():
        raise LlmosError(f"no tokenizer at {path}: give a tokenizer.json or a folder with one")
    try:
        backend = _Backend.from_file(str(path))
    except Exception as exc:  # the Rust side raises plain Exception for malformed files
        raise LlmosError(f"{path} is not a tokenizer.json ({exc})") from exc
    return _wrap(backend)

