"""Weight formats for speed: linear layers swapped in from outside the model files.

`linear_hook(form)` gives the loader (weights/load.py) a function that builds each Linear as:

- `bf16`: weights in bfloat16 (half the bytes of fp32).
- `int8`: weight-only int8, one symmetric scale per output channel, on the native kernels' int8 matmul
  when installed, else PyTorch's `_weight_int8pack_mm`. Activations enter the kernel as bfloat16 (the kernel is ~20x slower with
  fp32 activations) and leave in the caller's dtype, so the residual stream stays fp32.
- `int4`: weight-only int4, groups of 32 along the input with a scale and a zero point each, on
  `_weight_int4pack_mm_for_cpu`'s packed layout. GGUF Q4_1 blocks map onto it exactly (scale = d,
  zero = m + 8 d, since the kernel computes (q - 8) * scale + zero), so a Q4_1 model runs its own
  4-bit weights without requantization. With the native kernels installed (models/kernels.py,
  engine/native.py) the rows run their own kernel over the same bytes (exact products, fp32 out;
  ATen's rounds to bf16), else ATen's.

A decode step has one row per sequence, where these kernels read 4-8x fewer bytes than fp32. Prefill
has hundreds of rows, where bf16 matmul is fastest: the quantized layers then dequantize their weight
to bf16 for the call (a transient buffer of one layer) instead of using the row kernel. Int4Linear
unpacks straight from the kernel's packed layout, so no second copy of the weights is kept.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

from llmos.errors import LlmosError
from llmos.models import set_module
from llmos.models.kernels import PYTORCH, Kernels

FORMS = ("fp32", "bf16", "int8", "int4")
GROUP = 32
# Rows at or above which a quantized layer dequantizes to bf16 and uses a dense matmul. The int4 row
# kernel stays ahead for longer (3072 x 576, 2 threads, native kernel vs unpack + bf16 matmul: 0.33
# vs 0.46 ms at 64 rows, 0.65 vs 0.69 at 128, 2.5 vs 2.4 at 512; ATen's int4 kernel 0.69 / 1.4 / 6.3).
DENSE_ROWS = 32
INT4_DENSE_ROWS = 128


_local = threading.local()


def _scratch(size: int) -> torch.Tensor:
    """A bf16 buffer of `size` elements reused by this thread's dense int4 calls: a fresh multi-MB
    buffer per layer costs page faults (~10% of a 512-token prefill)."""
    buf = getattr(_local, "buf", None)
    if buf is None or buf.numel() < size:
        with torch.inference_mode(False):  # a normal tensor: writable inside inference mode and out of it
            buf = _local.buf = torch.empty(size, dtype=torch.bfloat16)
    return buf[:size]


class BF16Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.to(torch.bfloat16), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x.to(torch.bfloat16), self.weight).to(x.dtype)
        return y if self.bias is None else y + self.bias


class Int8Linear(nn.Module):
    kernels: Kernels = PYTORCH  # the model's, once installed: its int8_linear_mm runs first

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        w = weight.float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (N,)
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)  # (N, K)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)
        self.in_features, self.out_features = w.shape[1], w.shape[0]

    def dequantized(self) -> torch.Tensor:
        return self.qweight.to(torch.bfloat16) * self.scale[:, None]  # (N, K)

    def tied(self) -> Int8Head:
        """This head as one table that serves the embeddings too (Int8Head)."""
        return Int8Head(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)  # (M, K)
        y = None
        if rows.shape[0] >= DENSE_ROWS:
            y = F.linear(rows, self.dequantized())
        elif not rows.requires_grad:
            # the native kernels' int8_linear_mm: exact products, fp32 out, at the memory's speed where
            # ATen's kernel (bf16 out) is ~1.4x slower in a decode step; the C++ step runs it too
            y = self.kernels.int8_linear_mm(rows, self.qweight, self.scale)
        if y is None:
            y = torch.ops.aten._weight_int8pack_mm(rows, self.qweight, self.scale)
        y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias


class Int8Head(nn.Module):
    """A tied vocabulary head in int8 that also serves the token embeddings, stored once in the layout
    of the native extension's int8 row kernel (`packed` (N/64, K/2, 64, 2): the 64 outputs of a block
    side by side, two inputs each; scale bf16 (N,)). For Gemma 3 the 262,144 x 640 table is most of
    the model and most of the bytes a decode step reads: one 168 MB table instead of an int8 head
    beside an fp32 embedding (671 MB), read at the memory's speed by the native kernel (~2x ATen's
    `_weight_int8pack_mm` here). Without the extension, rows run ATen's kernel on an unpacked copy."""

    kernels: Kernels = PYTORCH  # the model's, once installed: its int8_mm runs first

    def __init__(self, linear: Int8Linear) -> None:
        super().__init__()
        N, K = linear.out_features, linear.in_features
        if N % 64 or K % 2:
            raise LlmosError(f"an int8 head needs a multiple of 64 outputs and an even input size, got {N} x {K}")
        packed = linear.qweight.view(N // 64, 64, K // 2, 2).permute(0, 2, 1, 3).contiguous()  # (N/64, K/2, 64, 2)
        self.register_buffer("packed", packed)
        self.register_buffer("scale", linear.scale)
        self.bias = None
        self.in_features, self.out_features = K, N

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The int8 rows of token ids (..., ) -> (..., K)."""
        flat = ids.reshape(-1)
        q = self.packed[flat // 64, :, flat % 64, :]  # (T, K/2, 2)
        return q.reshape(*ids.shape, self.in_features)

    def qweight(self) -> torch.Tensor:
        return self.packed.permute(0, 2, 1, 3).reshape(self.out_features, self.in_features)  # (N, K), a copy

    def embedding(self) -> HeadEmbedding:
        return HeadEmbedding(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)  # (M, K)
        y = None if rows.requires_grad else self.kernels.int8_mm(rows, self.packed, self.scale)
        if y is None:
            y = torch.ops.aten._weight_int8pack_mm(rows, self.qweight(), self.scale)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


class HeadEmbedding(nn.Module):
    """Token embeddings read from an Int8Head: row i is q[i] * scale[i]. The head is held, not
    registered, so the state dict stores the table once, under `output`."""

    def __init__(self, head: Int8Head) -> None:
        super().__init__()
        self.__dict__["head"] = head  # not a submodule: no second copy in state_dict()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        head = self.__dict__["head"]
        return head.rows(tokens).float() * head.scale[tokens].float().unsqueeze(-1)  # (..., C)


class Int4Linear(nn.Module):
    kernels: Kernels = PYTORCH  # the model's, once installed: its int4_mm and int4_unpack run first

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor | None) -> None:
        """q (N, K) integers in 0..15; scale, zero (N, K/32); w = (q - 8) * scale + zero."""
        super().__init__()
        N, K = q.shape
        if K % GROUP:
            raise LlmosError(f"int4 needs the input size to be a multiple of {GROUP}, got {K}")
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 2)
        sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()  # (K/32, N, 2)
        self.register_buffer("packed", packed)
        self.register_buffer("scales_zeros", sz.to(torch.bfloat16))
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)
        self.in_features, self.out_features = K, N

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> Int4Linear:
        N, K = weight.shape
        w = weight.float().view(N, K // GROUP, GROUP)  # (N, G, 32)
        lo, hi = w.amin(dim=-1), w.amax(dim=-1)  # (N, G)
        scale = ((hi - lo) / 15.0).clamp(min=1e-12)
        q = torch.round((w - lo[..., None]) / scale[..., None]).clamp(0, 15).view(N, K)
        return cls(q, scale, lo + 8 * scale, bias)

    @classmethod
    def from_q4_1(cls, d: torch.Tensor, m: torch.Tensor, q: torch.Tensor, bias: torch.Tensor | None = None) -> Int4Linear:
        """GGUF Q4_1 blocks (w = d * q + m) as they are, without requantizing."""
        return cls(q, d.float(), m.float() + 8 * d.float(), bias)

    def dequantized(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The weight (N, K) in bf16, as a transposed view of a (K, N) buffer (`out`, N*K elements,
        when given), unpacked from the CPU int4pack layout: for each block of 64 output rows, byte
        [k // 2, (k % 2) * 32 + r] holds row r's weight k in its low nibble and row r + 32's in its
        high nibble. Each weight is (q - 8) * scale + zero computed in fp32 and rounded once: one
        pass per nibble here, one pass in all with the native extension (same values)."""
        N, K = self.out_features, self.in_features
        if out is not None and self.kernels.int4_unpack(self.packed, self.scales_zeros, out):
            return out.view(K, N).t()  # the same values, one pass in C++
        blocks, groups = N // 64, K // GROUP
        nibbles = self.packed.view(blocks, groups, GROUP, 32).permute(1, 2, 0, 3)  # [k/32, k%32, block, r]
        scale, zero = self.scales_zeros.float().unbind(-1)  # (K/32, N) each
        scale = scale.view(groups, 1, blocks, 2, 32)
        base = zero.view(groups, 1, blocks, 2, 32) - 8 * scale
        out = (torch.empty(N * K, dtype=torch.bfloat16) if out is None else out).view(groups, GROUP, blocks, 2, 32)
        torch.addcmul(base[:, :, :, 0], nibbles & 15, scale[:, :, :, 0], out=out[:, :, :, 0])
        torch.addcmul(base[:, :, :, 1], nibbles >> 4, scale[:, :, :, 1], out=out[:, :, :, 1])
        return out.view(K, N).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)  # (M, K)
        y = None
        if rows.shape[0] >= INT4_DENSE_ROWS and self.out_features % 64 == 0:
            y = F.linear(rows, self.dequantized(_scratch(self.out_features * self.in_features)))
        elif not rows.requires_grad and self.out_features % 64 == 0:
            # the native kernels' int4_mm: exact products, fp32 out, 1.3-2x faster than ATen's from 1 to 127 rows
            y = self.kernels.int4_mm(rows, self.packed, self.scales_zeros)
        if y is None:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, GROUP, self.scales_zeros)
        y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias


def linear_hook(form: str):
    """A loader hook (weights/load.py) that builds each Linear directly in `form`; None for fp32,
    which keeps the model's own nn.Linear layers.

    The vocabulary head goes to int8 in both quantized forms: it is as fast as int4 there and keeps
    the 8-bit precision of the embedding table it usually shares."""
    if form not in FORMS:
        raise LlmosError(f"dtype must be one of {', '.join(FORMS)} (or auto), got {form!r}")
    if form == "fp32":
        return None

    def hook(name: str, weight: torch.Tensor, bias: torch.Tensor | None, exact: tuple[torch.Tensor, ...] | None) -> nn.Module:
        if form == "bf16":
            return BF16Linear(weight, bias)
        if form == "int8" or name == "output":
            return Int8Linear(weight, bias)
        if exact == ():  # the file keeps more than 4 bits here: 8, not a requantization to 4
            return Int8Linear(weight, bias)
        if exact is not None:
            return Int4Linear.from_q4_1(*exact, bias=bias)
        if weight.shape[1] % GROUP:
            return Int8Linear(weight, bias)  # the int4 kernel needs whole groups of 32
        return Int4Linear.from_float(weight, bias)

    return hook


def convert(model: nn.Module, form: str) -> nn.Module:
    """Every Linear of a model already in memory (the head too) swapped for `form`, in place: what
    `linear_hook` does while a file loads, for weights made in memory (a LoRA adapter merged into
    its base), which no longer match any GGUF blocks."""
    hook = linear_hook(form)
    if hook is None:
        return model
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name, m in linears:
        bias = m.bias.detach() if m.bias is not None else None
        set_module(model, name, hook(name, m.weight.detach(), bias, None))
    return model


KINDS: dict[str, type[nn.Module]] = {"BF16Linear": BF16Linear, "Int8Linear": Int8Linear, "Int4Linear": Int4Linear,
                                     "Int8Head": Int8Head}


def restore(kind: str, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """A layer of `kind` from its saved state (weights/converted.py), without re-quantizing:
    parameters for weight and bias, buffers for the packed forms, sizes read off the tensors."""
    module = KINDS[kind].__new__(KINDS[kind])
    nn.Module.__init__(module)
    module.bias = None
    for leaf, tensor in tensors.items():
        if leaf in ("weight", "bias"):
            setattr(module, leaf, nn.Parameter(tensor, requires_grad=False))
        else:
            module.register_buffer(leaf, tensor)
    if kind == "Int8Linear":
        module.out_features, module.in_features = module.qweight.shape
    elif kind == "Int8Head":
        blocks, half, _, _ = module.packed.shape
        module.out_features, module.in_features = blocks * 64, half * 2
    elif kind == "Int4Linear":
        module.out_features = module.scales_zeros.shape[1]
        module.in_features = module.scales_zeros.shape[0] * GROUP
    return module
