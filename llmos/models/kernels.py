"""Kernels: how a model's heavy operations run, chosen once at load time and handed to the model.

A model's layers ask their kernels first where a faster implementation may exist: prompt attention,
the int4 and int8 matrix products and int4 unpacking, the int8 head of a tied table (quant.Int8Head),
products and dequantization over a GGUF file's own blocks (gguf_linear.GGUFLinear); each method
returns None (False for unpacking) when it has nothing for those arguments, and the layer then runs
its own PyTorch op. The engine asks
them for a whole decode step (`decode`), and runs the model's Python forward when they have none.
`Kernels()` (`PYTORCH`) is the plain PyTorch path; the engine's C++ extension supplies
`engine.native.NativeKernels`.

`install(model, kernels)` hands the object to the model and to each of its layers that uses one
(classes that declare a `kernels` attribute, whose class default is `PYTORCH`): nothing is set
anywhere else, so two models in one process may run different kernels, and a model built without
`install` runs PyTorch's.
"""

from __future__ import annotations

import torch
from torch import nn


class Kernels:
    """The plain PyTorch path: no kernel of its own anywhere."""

    name = "pytorch"

    def causal_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor | None:
        """Causal attention of queries q (B, H, T, D) at positions start.. over keys 0..start+T-1."""
        return None

    def int4_mm(self, x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor) -> torch.Tensor | None:
        """Rows x (M, K) bf16 times an int4pack weight: (M, N) fp32."""
        return None

    def int4_unpack(self, packed: torch.Tensor, scales_zeros: torch.Tensor, out: torch.Tensor) -> bool:
        """An int4pack weight unpacked into `out` (bf16, N*K elements); False when not done."""
        return False

    def int8_mm(self, x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
        """Rows x (M, K) bf16 times an int8 head in quant.Int8Head's packed layout: (M, N) fp32."""
        return None

    def int8_linear_mm(self, x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
        """Rows x (M, K) bf16 times quant.Int8Linear's weights (qweight int8 (N, K), scale bf16 (N,)): (M, N) fp32."""
        return None

    def gguf_mm(self, x: torch.Tensor, raw: torch.Tensor, qtype: int, n: int) -> torch.Tensor | None:
        """Rows x (M, K) fp32 times a weight (n, K) given as a GGUF file's blocks of GGML type `qtype`
        (contiguous uint8, as stored): (M, n) fp32 with the weights exactly gguf-py's dequantization."""
        return None

    def gguf_dequantize(self, raw: torch.Tensor, qtype: int, out: torch.Tensor) -> bool:
        """GGUF blocks dequantized into `out` ((N, K) fp32, or bf16: those values rounded once);
        False when not done."""
        return False

    def decode(self, model: nn.Module, tokens: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor | None:
        """One whole decode step (tokens (B,) at `positions`): logits (B, V) fp32, or None."""
        return None


PYTORCH = Kernels()


def install(model: nn.Module, kernels: Kernels) -> nn.Module:
    """Hand `kernels` to the model (whose class declares `kernels = PYTORCH`: the engine asks it) and to
    every layer of it that uses kernels; returns the model."""
    model.kernels = kernels
    for module in model.modules():
        if hasattr(type(module), "kernels"):
            module.kernels = kernels
    return model
