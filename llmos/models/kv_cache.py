"""A static, preallocated key/value cache shared by the decoder-only model files.

One tensor pair holds every layer: k and v of shape (L, B, H_kv, S, D), allocated once at the
largest length the caller will need, so decoding never reallocates. The model writes the keys and
values of the positions it is given and reads back everything up to the furthest position written.
`length` is the number of leading positions that hold valid entries; callers that rewind (a chat
that shares a history prefix) just lower it. `extent` is where the prompt being prefilled ends (set by
the engine before prefilling it in chunks, 0 when unknown): a model whose rotary frequencies depend on
the sequence's length (LongRoPE) chooses them by it, so every chunk gets what the whole prompt gets.

The cache holds the dtype its caller names (`cache_dtype`), by default the model's weights': the
loader's choice for a form (weights/loader.py `kv_dtype`) is fp16 for the quantized forms, passed
explicitly to the engine (`kv_dtype=`) by whoever holds the model (llmos.LLM). That halves the
bytes a decode step reads per cached position (at 16 rows x 70 positions, 54 MB a step in fp32) at
~5e-4 relative rounding, far below their weights' own. Keys and values are rounded once, when written; attention reads them back
widened to fp32.
"""

from __future__ import annotations

import torch


def cache_dtype(model, kv_dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype a cache for `model` holds: `kv_dtype` when the caller names one, else its weights'."""
    return kv_dtype or next(model.parameters()).dtype


class KVCache:
    def __init__(
        self,
        n_layers: int,
        batch: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)  # (L, B, H, S, D)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0
        self.extent = 0
        self._step: tuple = (None,)

    @classmethod
    def for_model(cls, config, batch: int, max_len: int, dtype: torch.dtype = torch.float32) -> KVCache:
        if max_len > config.max_seq_len:
            raise ValueError(f"KV cache of {max_len} positions exceeds the model context ({config.max_seq_len})")
        return cls(config.n_layers, batch, config.n_kv_heads, max_len, config.head_size, dtype)

    def rows(self, start: int, stop: int) -> KVCache:
        """A cache over rows start..stop-1 that shares this one's storage (writes go through)."""
        view = KVCache.__new__(KVCache)
        view.k, view.v = self.k[:, start:stop], self.v[:, start:stop]
        view.max_len, view.length, view.extent, view._step = self.max_len, self.length, self.extent, (None,)
        return view

    def begin(self, positions: torch.Tensor) -> int:
        """Plan the writes of one forward at `positions` (T,) or per row (B, T), once for all layers;
        return how many keys each layer will read back."""
        end = int(positions.max()) + 1
        if end > self.max_len:
            raise ValueError(f"position {end - 1} is beyond the KV cache size ({self.max_len})")
        n = max(self.length, end)
        if positions.dim() == 2:  # per-row positions: scatter each row's entries
            B, T = positions.shape
            where = (torch.arange(B)[:, None].expand(B, T), slice(None), positions)
            n = end
        else:
            start = int(positions[0])
            # A contiguous run is a slice copy, cheaper than index_copy.
            where = slice(start, end) if end - start == positions.numel() else positions
        self._step = (positions, where, end, self.k[:, :, :, :n], self.v[:, :, :, :n])
        return n

    def wrote(self) -> None:
        """Close the step `begin` planned, once its writes are made (by `update` at the last layer, or
        outside it by the native decode step)."""
        _, where, end, _, _ = self._step
        if not isinstance(where, tuple):  # per-row writes leave `length` to the batched engine
            self.length = max(self.length, end)
        self._step = (None,)

    def update(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H, T, D) at `positions` (T,) or per row (B, T); return the keys and
        values (B, H, S, D) up to the furthest position written."""
        if self._step[0] is not positions:
            self.begin(positions)
        _, where, _, keys, values = self._step
        k, v = k.to(self.k.dtype), v.to(self.v.dtype)  # rounded once here when the cache is fp16
        if isinstance(where, tuple):
            self.k[layer][where] = k.transpose(1, 2)  # (B, T, H, D)
            self.v[layer][where] = v.transpose(1, 2)
        elif isinstance(where, slice):
            self.k[layer, :, :, where] = k
            self.v[layer, :, :, where] = v
        else:
            self.k[layer].index_copy_(2, where, k)
            self.v[layer].index_copy_(2, where, v)
        if layer == self.k.shape[0] - 1:
            self.wrote()
        return keys[layer], values[layer]
