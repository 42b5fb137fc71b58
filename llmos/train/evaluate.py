"""Perplexity of a model on held-out text: the number `llmos eval perplexity` prints.

`perplexity(model, tokenizer, paths, seq_len)` tokenizes the files as training does (documents end
with EOS; chat JSONL counts assistant tokens only), cuts the stream into non-overlapping windows of
`seq_len + 1` tokens (a tail shorter than one window is left out), and returns the mean
cross-entropy per target token and its exponential. Two models with the same tokenizer evaluated on
the same files see exactly the same tokens, so their numbers compare (a before/after table); models
with different tokenizers do not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from llmos.errors import LlmosError
from llmos.tokenizer import Tokenizer
from llmos.train.data import Windows, encode_document, iter_documents
from llmos.train.loop import token_losses


@dataclass(frozen=True)
class Perplexity:
    loss: float  # mean nats per target token
    ppl: float
    tokens: int  # target tokens scored


def encode_files(paths: Sequence[str | Path], tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    ids: list[int] = []
    mask: list[int] = []
    for doc in iter_documents(paths):
        d_ids, d_mask = encode_document(doc, tokenizer)
        ids += d_ids
        mask += d_mask
    return np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.uint8)


@torch.no_grad()
def perplexity(
    model: nn.Module, tokenizer: Tokenizer, paths: Sequence[str | Path], seq_len: int = 256, batch_size: int = 8
) -> Perplexity:
    ids, mask = encode_files(paths, tokenizer)
    max_len = getattr(getattr(model, "config", None), "max_seq_len", seq_len)
    seq_len = min(seq_len, max_len, len(ids) - 1)
    if seq_len < 1:
        raise LlmosError("the evaluation text is too short: it needs at least two tokens")
    if int(ids.max()) >= getattr(model.config, "vocab_size", int(ids.max()) + 1):
        raise LlmosError("the tokenizer produces ids outside this model's vocabulary: they do not belong together")
    windows = Windows(ids, mask, seq_len)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    for start in range(0, windows.n, batch_size):
        x, y, m = (t.to(device) for t in windows.rows(range(start, min(start + batch_size, windows.n))))
        total += float(token_losses(model, x, y, m))
        count += float(m.sum())
    model.train(was_training)
    if count == 0:
        raise LlmosError("nothing to score: the evaluation data has no target tokens (chat data without assistant turns?)")
    loss = total / count
    return Perplexity(loss, math.exp(min(loss, 50.0)), int(count))
