"""A linear layer that runs a GGUF file's own quantized blocks: the "file's own form" of issue 18.

`GGUFLinear(parts, bias)` holds one or more row blocks of a weight, each the raw bytes of a GGUF tensor
(or some of its rows) in its own type (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K): a fused layer
(q/k/v, gate/up) whose parts the file stores in different types stays one layer. The bytes are kept
as given, usually a view of the memory map, so a layer costs no memory beyond the file's pages.

- Few rows (decode, small batches, < DENSE_ROWS): the installed kernels' products over the blocks
  (models/kernels.py `gguf_mm`: engine/gguf_kernels.cpp with the native kernels), fp32 activations in
  and out, the weights exactly gguf-py's dequantization (no second rounding).
- Many rows (prefill): the weight dequantized into a reused per-thread bf16 buffer (quant.py's, shared
  with the int4 layers) and one bf16 matmul, as the int4 form does; these weights are rounded once
  more, to bf16, as every dense bf16 path is.
- With PyTorch's kernels (no compiler, LLMOS_NATIVE=0, a model not `install`ed): the Python
  dequantization (weights/dequant.py) and an fp32 matmul: the same numbers, slowly.

`GGUFEmbedding(head)` reads token rows from a head's blocks, so a tied vocabulary table (Gemma 3's
262,144 x 640 Q8_0) is stored once, in the file, with no fp32 copy; `GGUFEmbedding(table, tied=False)`
owns a table of its own (an untied model's token_embd).

The loader (weights/load.py, the "gguf" form) builds these from views of the file's memory map.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from llmos import quant
from llmos.errors import LlmosError
from llmos.models.kernels import PYTORCH, Kernels
from llmos.weights.dequant import GGML_TYPES, dequantize, type_name

# Rows at or above which the layer dequantizes to bf16 for a dense matmul. The row kernel is ahead up
# to ~8 rows (2048 x 2048 Q4_K, one thread: 1.08 vs 1.10 ms at 8, 1.84 vs 1.45 at 16), but decode
# batches stay on it up to quant.DENSE_ROWS like the int8 form, so a row decoded in a batch of up to
# 31 gets the exact (fp32, gguf's weights) bits it gets alone.
DENSE_ROWS = quant.DENSE_ROWS


# GGML type ids the kernels read (engine/gguf_kernels.py's QTYPES; a test keeps the two equal).
QTYPES = frozenset({2, 3, 6, 7, 8, 12, 13, 14})  # Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K


class GGUFLinear(nn.Module):
    kernels: Kernels = PYTORCH  # the model's, once installed: its gguf_mm and gguf_dequantize run first

    def __init__(self, parts: list[tuple[torch.Tensor, int]], bias: torch.Tensor | None = None) -> None:
        """parts: (raw, qtype) per row block, in output order: raw (rows, row_bytes) contiguous uint8,
        the GGUF bytes of `rows` weight rows of type `qtype`; every part has the same input size."""
        super().__init__()
        if not parts:
            raise LlmosError("GGUFLinear needs at least one part")
        sizes = []
        for i, (raw, qtype) in enumerate(parts):
            if qtype not in QTYPES:
                raise LlmosError(f"GGUFLinear cannot run GGML type {type_name(qtype)}")
            _, block, size = GGML_TYPES[qtype]
            if raw.dtype != torch.uint8 or raw.dim() != 2 or raw.shape[1] % size:
                raise LlmosError(f"GGUFLinear part {i}: need (rows, row_bytes) uint8 of whole {type_name(qtype)} blocks")
            sizes.append(raw.shape[1] // size * block)
            self.register_buffer(f"raw{i}", raw.contiguous(), persistent=True)
        if len(set(sizes)) != 1:
            raise LlmosError(f"GGUFLinear parts have different input sizes: {sizes}")
        self.qtypes = [q for _, q in parts]
        self.part_rows = [raw.shape[0] for raw, _ in parts]
        self.in_features, self.out_features = sizes[0], sum(self.part_rows)
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)

    def parts(self) -> list[tuple[torch.Tensor, int]]:
        return [(getattr(self, f"raw{i}"), q) for i, q in enumerate(self.qtypes)]

    def dequantized(self, out: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight (N, K) in fp32 (gguf-py's values) or bf16 (those rounded once), into `out` when given."""
        N, K = self.out_features, self.in_features
        out = torch.empty(N, K, dtype=dtype) if out is None else out.view(N, K)
        start = 0
        for raw, qtype in self.parts():
            rows = out[start : start + raw.shape[0]]
            if not self.kernels.gguf_dequantize(raw.view(-1), qtype, rows):
                rows.copy_(dequantize(raw.view(-1), qtype, (raw.shape[0], K)))
            start += raw.shape[0]
        return out

    def token_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` (...,) of the weight in fp32, (..., K): an embedding lookup on the blocks."""
        flat = ids.reshape(-1)
        out = torch.empty(flat.numel(), self.in_features)
        start = 0
        for raw, qtype in self.parts():
            mine = (flat >= start) & (flat < start + raw.shape[0])
            if mine.any():
                picked = raw[flat[mine] - start].contiguous()  # (T, row_bytes): the rows' blocks
                rows = torch.empty(picked.shape[0], self.in_features)
                if not self.kernels.gguf_dequantize(picked.view(-1), qtype, rows):
                    rows = dequantize(picked.view(-1), qtype, tuple(rows.shape))
                out[mine] = rows
            start += raw.shape[0]
        return out.view(*ids.shape, self.in_features)

    def embedding(self, tied: bool = True) -> GGUFEmbedding:
        return GGUFEmbedding(self, tied)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # (M, K)
        if rows.shape[0] >= DENSE_ROWS:
            w = self.dequantized(quant._scratch(self.out_features * self.in_features), torch.bfloat16)
            y = F.linear(rows.to(torch.bfloat16), w).float()
        else:
            y = self._rows(rows.float().contiguous())
        y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def _rows(self, rows: torch.Tensor) -> torch.Tensor:
        outs = []
        for raw, qtype in self.parts():
            y = self.kernels.gguf_mm(rows, raw.view(-1), qtype, raw.shape[0])
            if y is None:  # PyTorch's kernels: the same weights through the Python dequantization
                y = F.linear(rows, dequantize(raw.view(-1), qtype, (raw.shape[0], self.in_features)))
            outs.append(y)
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


class GGUFEmbedding(nn.Module):
    """Token embeddings read from a GGUFLinear's blocks: row i is its weight row i, in fp32. A tied
    head is held, not registered, so the state dict stores the table once (under the head); with
    `tied=False` the table is this module's own (registered as `table`)."""

    def __init__(self, head: GGUFLinear, tied: bool = True) -> None:
        super().__init__()
        if tied:
            self.__dict__["table"] = head  # not a submodule: no second copy in state_dict()
        else:
            self.table = head

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table.token_rows(tokens)


def blocks_hook(declined: list[tuple[str, list[int]]]) -> Callable[..., GGUFLinear | None]:
    """A loader hook (weights/load.py's BlocksHook) for the "gguf" form: a GGUFLinear over each weight
    (and the token table) whose parts are all of types the kernels run; None for the others, which
    the loader then dequantizes, each appended to `declined` as (name, GGML types) for its note."""

    def hook(name: str, parts: list[tuple[torch.Tensor, int]], bias: torch.Tensor | None) -> GGUFLinear | None:
        if all(qtype in QTYPES for _, qtype in parts):
            return GGUFLinear(parts, bias)
        declined.append((name, [qtype for _, qtype in parts]))
        return None

    return hook
