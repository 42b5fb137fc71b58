"""The native kernels (native_step.cpp): a whole decode step in C++, the Python model file's
computation without Python's per-op cost, and the kernels the Python model calls (int4 matmul and
unpacking, prompt attention). The element-wise work gives the Python step's bits; RMSNorm sums in
double, attention runs in its own kernel (one thread per row and kv head, ~3e-7 from SDPA) and int4
layers in their own AVX512-BF16 matmul (exact products summed in fp32), so results do not depend on
the thread count and a row decoded in a batch gets the bits it gets alone (`make bench` and
`LLMOS_NATIVE=0 llmos bench` show the speed with it and without it).

The extension is compiled once per PyTorch version and source (about 20 s with g++), into
$LLMOS_HOME/native, by `build()`; `make run` and `make test` build it, and so does the first
`llmos.load` on a machine with a compiler. Without a compiler (or with LLMOS_NATIVE=0) everything
runs the Python path (within 1e-5 in fp32; the bf16-rounded forms can differ by a bf16 step).

`kernels()` is what a loader installs on a model (models/kernels.py): `NativeKernels` over the built
extension, or the plain PyTorch kernels where it cannot be built. Nothing is set at import: a model
runs these kernels only once they are installed on it. `stepper(model)` returns a function doing one
decode step of a Llama-family model (Mistral's window and Qwen3's q/k norms included), a Gemma 2 or a
Gemma 3 model, or None when the model is outside what the C++ step covers (GPT-2, partial rotary,
LoRA adapters, a layer kind it does not know, head sizes that are not a multiple of 16 or over 256,
Gemma 2 on a CPU without AVX-512); the engine then runs the model's Python forward, which still calls
the kernels it has. GGUF layers (the "gguf" form) run their kernels, which live in another extension
(engine/gguf_kernels.py), straight from the C++ step through that extension's `matmul_capsule` (the
same kernel their Python forward calls, so the same bits; ~2 ms a Gemma 3 270M step less than calling
their forward, 73 calls a step); where that extension cannot be built, their Python forward is called.
"""

from __future__ import annotations

import math
import sys
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmos import quant
from llmos.engine import extension, gguf_kernels
from llmos.models.kernels import PYTORCH, Kernels
from llmos.models.kv_cache import KVCache
from llmos.gguf_linear import GGUFEmbedding, GGUFLinear
from llmos.models.bert import Bert, Packing
from llmos.models.gemma2 import Gemma2, softcap
from llmos.models.gemma3 import Gemma3
from llmos.models.llama import Llama

SOURCE = Path(__file__).with_name("native_step.cpp")
EXTENSION = extension.Extension("llmos_native_step", SOURCE, prefix="", what="the native decode step",
                                fallback="the Python decode step", seconds=20)
enabled = extension.enabled
failure = EXTENSION.failure


def build(quiet: bool = False):
    """Compile (once) and import the extension; None when it cannot be built, with the reason kept
    in `failure()`."""
    return EXTENSION.build(quiet)


class NativeKernels(Kernels):
    """The extension's kernels (see models/kernels.py for the contract): each returns None where the
    extension lacks the function (a CPU without the instructions it needs) or the arguments are not
    ones it takes; the caller then runs its PyTorch op. Decode steps are built per model on first use
    and rebuilt when the model's layers were swapped since (`model.swaps`, counted by set_module)."""

    name = "native"

    def __init__(self, module: Any) -> None:
        self.module = module
        self._steps: weakref.WeakKeyDictionary[nn.Module, tuple[int, Callable | None]] = weakref.WeakKeyDictionary()

    def causal_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor | None:
        fn = getattr(self.module, "causal_attention", None)
        if fn is None or k.dtype not in (torch.float32, torch.float16) or v.dtype != k.dtype or k.stride(-1) != 1 or v.stride(-1) != 1:
            return None
        return fn(q, k, v, start)

    def int4_mm(self, x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor) -> torch.Tensor | None:
        fn = getattr(self.module, "int4_mm", None)
        return None if fn is None else fn(x, packed, scales_zeros)

    def int4_unpack(self, packed: torch.Tensor, scales_zeros: torch.Tensor, out: torch.Tensor) -> bool:
        fn = getattr(self.module, "int4_unpack", None)
        if fn is not None:
            fn(packed, scales_zeros, out)
        return fn is not None

    def int8_mm(self, x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
        fn = getattr(self.module, "int8_mm", None)
        return None if fn is None else fn(x, packed, scale)

    def int8_linear_mm(self, x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
        fn = getattr(self.module, "int8_linear_mm", None)
        if fn is None or qweight.shape[0] % 4 or qweight.shape[1] % 32 or not qweight.is_contiguous():
            return None
        return fn(x, qweight, scale)

    def gguf_mm(self, x: torch.Tensor, raw: torch.Tensor, qtype: int, n: int) -> torch.Tensor | None:
        return gguf_kernels.matmul(x, raw, qtype, n)  # a second extension, built on first use

    def gguf_dequantize(self, raw: torch.Tensor, qtype: int, out: torch.Tensor) -> bool:
        return gguf_kernels.dequantize(raw, qtype, out)

    def decode(self, model: nn.Module, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor | None:
        swaps = model.__dict__.get("swaps", 0)
        entry = self._steps.get(model)
        if entry is None or entry[0] != swaps:  # built, or rebuilt after LoRA swapped layers in
            entry = self._steps[model] = (swaps, stepper(model, self.module))
        return None if entry[1] is None else entry[1](tokens, positions, cache)


_kernels: NativeKernels | None = None


def kernels(quiet: bool = False) -> Kernels:
    """The kernels a loader installs: the native ones when the extension is built (compiling it on
    the first call on a machine) and LLMOS_NATIVE is not 0, else PyTorch's."""
    global _kernels
    module = build(quiet) if enabled() else None
    if module is None:
        return PYTORCH
    if _kernels is None or _kernels.module is not module:
        _kernels = NativeKernels(module)
    return _kernels


def keep_freed_memory() -> None:
    """Let glibc keep large freed blocks for reuse. With its defaults a prompt's multi-MB activations
    are mapped and unmapped (or trimmed off the heap) over and over, faulting in fresh pages: 6,000-
    43,000 minor faults a 512-token prefill of the default model. Blocks up to 64 MB now come from the
    heap and up to 256 MB of free heap is kept: 0-300 faults (tests/engine/test_native.py), peak
    memory unchanged (bench/run.py measures it). A process-wide setting, so called explicitly by the
    process that is here to run a model, after loading it (`llmos.load`, `llmos bench`): set before,
    a load's own temporary buffers stay on the heap (Gemma 3's peak RSS: +20-28 MB). No-op outside
    glibc and with LLMOS_NATIVE=0."""
    if not sys.platform.startswith("linux") or not enabled():
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    mallopt(M_MMAP_THRESHOLD, 64 << 20)
    mallopt(M_TRIM_THRESHOLD, 256 << 20)


_KINDS = {nn.Linear: 0, quant.BF16Linear: 1, quant.Int8Linear: 2, quant.Int4Linear: 3, GGUFLinear: 5}


def _linear_args(layer: nn.Module) -> tuple[int, list[torch.Tensor | None]] | None:
    kind = _KINDS.get(type(layer))
    if kind is None:
        return None
    if kind == 5:  # its parts go to decode_step apart (stepper's gguf lists); bias as GGUFLinear adds it
        return kind, [None, None, layer.bias]
    if kind in (0, 1):
        return kind, [layer.weight, None, layer.bias]
    if kind == 2:
        return kind, [layer.qweight, layer.scale, layer.bias]
    return kind, [layer.packed, layer.scales_zeros, layer.bias]


def _head_args(head: nn.Module, module: Any) -> tuple[int, list[torch.Tensor | None]] | None:
    """The vocabulary head as decode_step's kind and tensors: int8 heads in int8_mm's layout."""
    if isinstance(head, quant.Int8Head):  # a tied Gemma table, already in that layout
        return (4, [head.packed, head.scale, None]) if hasattr(module, "int8_mm") else None
    args = _linear_args(head)
    if args is not None and args[0] == 2 and hasattr(module, "int8_mm") and head.out_features % 64 == 0 \
            and head.in_features % 32 == 0:
        # The vocabulary head in int8_mm's layout: a second copy of its int8 weights (28 MB for the
        # default model) for the faster kernel.
        return 4, [module.int8_pack(head.qweight), head.scale, head.bias]
    return args


def _covered(model: nn.Module, module: Any) -> bool:
    """Whether the C++ step computes what this model's Python forward computes."""
    config = model.config
    if type(model) not in (Llama, Gemma2, Gemma3):  # GPT-2, BERT
        return False
    if type(model) is Gemma2 and not hasattr(module, "causal_attention"):
        return False  # soft-capped scores need the AVX-512 attention kernel (built with it)
    embed = model.embed  # the rows the step starts from must be fp32: the tables held in int8 or GGUF blocks give fp32
    embed_dtype = torch.float32 if isinstance(embed, (quant.HeadEmbedding, GGUFEmbedding)) else embed.weight.dtype
    return embed_dtype == torch.float32 and config.rotary_dim == config.head_size \
        and config.head_size % 16 == 0 and config.head_size <= 256 \
        and config.n_heads // config.n_kv_heads <= 8  # what the C++ attention handles


def _family(model: nn.Module) -> dict[str, Any]:
    """What decode_step needs to know of the model's family beyond the weights (native_step.cpp)."""
    config, layers = model.config, model.layers
    head_dim = config.head_size
    if type(model) is Llama:
        return {"post_norms": False, "norm_plus_one": False, "act": "silu", "q_scale": 1.0, "attn_scale": head_dim ** -0.5,
                "attn_cap": 0.0, "embed_scale": None, "final_cap": None, "rope_of": [0] * config.n_layers,
                "windows": [config.sliding_window or 0] * config.n_layers}
    window = [(config.sliding_window or 0) if block.sliding else 0 for block in layers]
    # sqrt(dim) rounded to fp32 first, as the Gemma files scale their embeddings
    embed_scale = torch.tensor(math.sqrt(config.dim), dtype=torch.float32)
    if type(model) is Gemma2:
        return {"post_norms": True, "norm_plus_one": True, "act": "gelu_tanh" if layers[0].mlp.approximate == "tanh" else "gelu",
                "q_scale": 1.0, "attn_scale": layers[0].attn.scale, "attn_cap": config.attn_softcap or 0.0,
                "embed_scale": embed_scale, "final_cap": config.final_softcap, "rope_of": [0] * config.n_layers, "windows": window}
    # Gemma 3: per layer, sliding (rope table 1, the local base, and the window) or full (table 0)
    return {"post_norms": True, "norm_plus_one": False, "act": "gelu_tanh", "q_scale": layers[0].attn.q_scale,
            "attn_scale": head_dim ** -0.5, "attn_cap": 0.0, "embed_scale": embed_scale, "final_cap": None,
            "rope_of": [int(block.sliding) for block in layers], "windows": window}


def stepper(model: nn.Module, module: Any = None) -> Callable[[torch.Tensor, torch.Tensor, KVCache], torch.Tensor | None] | None:
    """A function (tokens (B,), positions, cache) -> logits (B, V) fp32 that runs the C++ step (None
    for a batch too large for it), or None when this model (or this machine) cannot use it.
    `module`: the built extension (default: build it).

    Llama (with Mistral's window and Qwen3's q/k norms), Gemma 2 and Gemma 3 share the step: the Gemmas
    add norms of the attention and MLP outputs, GeGLU, per-layer windows, embeddings scaled here before
    the step; Gemma 3 q/k norms, a query scale and a RoPE base per layer kind; Gemma 2 (1 + w) norms and
    soft-capped scores and logits (the final cap applied here, with the model's own function)."""
    module = module if module is not None else build()
    if module is None or not _covered(model, module):
        return None
    config = model.config
    family = _family(model)
    kinds: list[int] = []
    tensors: list[torch.Tensor | None] = []
    calls: list[Callable | None] = []  # kind 5's forward, None for the others
    # kind 5's parts, flat: raw blocks and GGML types, linear i's being gguf_first[i]:gguf_first[i + 1]
    gguf_raws: list[torch.Tensor] = []
    gguf_qtypes: list[int] = []
    gguf_first: list[int] = [0]

    def add_linear(layer: nn.Module, kind: int, args: list[torch.Tensor | None]) -> None:
        kinds.append(kind)
        tensors.extend(args)
        calls.append(layer.forward if kind == 5 else None)
        if kind == 5:
            for raw, qtype in layer.parts():
                gguf_raws.append(raw)
                gguf_qtypes.append(qtype)
        gguf_first.append(len(gguf_raws))

    norms: list[torch.Tensor] = []
    qk_norm = getattr(model.layers[0].attn, "q_norm", None) is not None
    for block in model.layers:
        norms += [block.attn_norm.weight, block.mlp_norm.weight]
        if family["post_norms"]:
            norms += [block.post_attn_norm.weight, block.post_mlp_norm.weight]
        if qk_norm:
            norms += [block.attn.q_norm.weight, block.attn.k_norm.weight]
        for layer in (block.attn.wqkv, block.attn.wo, block.mlp.w13, block.mlp.w2):
            args = _linear_args(layer)
            if args is None:
                return None
            add_linear(layer, *args)
    head = _head_args(model.output, module)
    if head is None:
        return None
    add_linear(model.output, *head)
    gguf_module = gguf_kernels.build() if gguf_raws and gguf_kernels.enabled() else None
    gguf_matmul = getattr(gguf_module, "matmul_capsule", None)
    gguf_matmul = gguf_matmul() if gguf_matmul is not None else None  # None: kind 5 through `calls`
    norms.append(model.norm.weight)
    heads, kv_heads, head_dim, eps = config.n_heads, config.n_kv_heads, config.head_size, config.norm_eps
    dense_rows = min(quant.DENSE_ROWS, quant.INT4_DENSE_ROWS)
    embed_scale, final_cap = family["embed_scale"], family["final_cap"]
    # Gemma 3's rope tables differ by layer kind (full, sliding); the other families have one
    kinds_of_rope = (False, True) if type(model) is Gemma3 else None

    def step(tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor | None:
        """tokens (B,) at `positions`: (1,) shared by every row, or (B, 1) per row (the batched
        engine's rows, each attending over its own keys): as `model.hidden` then `model.logits`."""
        if tokens.shape[0] >= dense_rows or cache.k.dtype not in (torch.float32, torch.float16):  # the Python path covers these
            return None
        n_keys = cache.begin(positions)
        x = model.embed(tokens)  # (B, C)
        if embed_scale is not None:
            x = x * embed_scale
        # rows of (D,) for the shared position or each row's
        tables = [model.rope(positions, sliding) for sliding in kinds_of_rope] if kinds_of_rope else [model.rope(positions)]
        per_row = positions.dim() == 2
        D = head_dim
        logits = module.decode_step(x, positions.flatten().tolist(), per_row, n_keys,
                                    [c.reshape(-1, D) for c, _ in tables], [s.reshape(-1, D) for _, s in tables],
                                    family["rope_of"], family["windows"], cache.k, cache.v, norms, kinds, tensors,
                                    heads, kv_heads, head_dim, eps, family["post_norms"], qk_norm, family["norm_plus_one"],
                                    family["act"], family["q_scale"], family["attn_scale"], family["attn_cap"], calls,
                                    gguf_raws, gguf_qtypes, gguf_first, gguf_matmul)
        cache.wrote()
        return logits if final_cap is None else softcap(logits, final_cap)

    return step


if __name__ == "__main__":  # `python -m llmos.engine.native`: build it now (make run / make test do)
    if build() is None:
        print(f"llmos: {failure() or 'native decode step disabled (LLMOS_NATIVE=0)'}", file=sys.stderr)


_encoders: weakref.WeakKeyDictionary[nn.Module, tuple[list[torch.Tensor], list[torch.Tensor]]] = weakref.WeakKeyDictionary()


def encoder_forward(model: Bert, tokens: torch.Tensor, packing: Packing, threads: int = 0) -> torch.Tensor | None:
    """`model.forward_packed(tokens, packing)` (fp32 or bf16 linears) as one C++ call that releases the
    GIL (the same ATen calls, the same bits), on `threads` threads of the calling thread (0: its own
    setting); None where the extension is not built or turned off, or the model is not plain."""
    module = build() if enabled() else None  # compiled on a machine's first use, saying so
    fn = getattr(module, "bert_forward", None)
    B, T = tokens.shape
    if fn is None or T > model.config.max_seq_len:  # forward_packed says what is wrong with T
        return None
    args = _encoders.get(model)
    if args is None:
        if any(type(m) is not nn.Linear for m in model.modules() if isinstance(m, nn.Linear)):
            return None  # a layer swapped for another kind: its own forward
        e = model.embeddings
        embeds = [e.embed.weight, e.pos_embed.weight, e.type_embed.weight, e.norm.weight, e.norm.bias]
        layers = [t for b in model.layers for t in (b.attn.wqkv.weight, b.attn.wqkv.bias, b.attn.wo.weight, b.attn.wo.bias,
                                                     b.attn_norm.weight, b.attn_norm.bias, b.mlp.fc.weight, b.mlp.fc.bias,
                                                     b.mlp.proj.weight, b.mlp.proj.bias, b.mlp_norm.weight, b.mlp_norm.bias)]
        args = _encoders[model] = (embeds, layers)
    index = packing.index
    positions = torch.arange(T).repeat(B)[index]  # (N,): each text counts from 0, as forward_packed
    types = torch.zeros(len(index), dtype=torch.long)
    first = model.layers[0]
    return fn(tokens.reshape(-1)[index], positions, types, list(packing.lengths), args[0], args[1], first.attn.n_heads,
              first.attn_norm.eps, first.mlp.approximate == "tanh", threads)
