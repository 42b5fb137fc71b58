"""Checkpoint -> model: meta-device init, rename by table, a few named transforms, assign.

The flow for every format: build the model on the meta device (no memory), read each source tensor
once (memory-mapped, dequantized when quantized), rename it with a table from names.py, apply the
named transforms (GGUF q/k un-permutation, Conv1D transpose, q/k/v and gate/up fusion), and hand the
result to `load_state_dict(assign=True)`, so no checkpoint is ever held in memory twice.

A GGUF file can also keep its own blocks (`load_gguf(..., blocks_hook=...)`, the "gguf" form): each
Linear and the token table is handed over as views of the map, one (rows, row_bytes) part per source
tensor, with the same row transforms (llama's q/k rows are un-permuted: a row is its own blocks, so
reordering rows is exact), and nothing of it is dequantized.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from llmos.config import ModelConfig
from llmos.models import set_module
from llmos.errors import LlmosError
from llmos.models.gemma2 import Gemma2
from llmos.models.gemma3 import Gemma3
from llmos.models.gpt2 import GPT2
from llmos.models.llama import Llama
from llmos.weights import names
from llmos.weights.dequant import q4_1_blocks, q4_k_blocks
from llmos.weights.gguf import GGUFFile
from llmos.weights.safetensors import SafetensorsCheckpoint

Q4_1 = 3  # GGML type ids
Q4_K = 12
# Types that keep more than 4 bits a weight: a 4-bit form does not requantize them (see `read_blocks`).
WIDE_TYPES = (0, 1, 6, 7, 8, 13, 14, 30)  # F32, F16, Q5_0, Q5_1, Q8_0, Q5_K, Q6_K, BF16
MODEL_FILES: dict[str, type[nn.Module]] = {"llama": Llama, "gemma2": Gemma2, "gemma3": Gemma3, "gpt2": GPT2}


_INIT_FUNCTIONS = ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_", "ones_", "zeros_")


@contextlib.contextmanager
def _skip_init() -> Iterator[None]:
    """Modules' random initialisation is wasted work for weights about to be assigned, and on the
    meta device `normal_` pulls in torch's reference-op modules (over a second of imports)."""
    saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS}
    for name in _INIT_FUNCTIONS:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def build_model(config: ModelConfig, device: str | torch.device = "meta") -> nn.Module:
    """An uninitialised model of the config's family (on the meta device: no memory)."""
    cls = MODEL_FILES.get(config.arch)
    if cls is None:
        raise LlmosError(f"no causal language model file for architecture {config.arch!r}")
    # Random init only means something for real memory (training from scratch builds on "cpu").
    with torch.device(device), (_skip_init() if torch.device(device).type == "meta" else contextlib.nullcontext()):
        try:
            return cls(config)
        except (RuntimeError, OverflowError) as exc:  # sizes past what a tensor can describe, even on meta
            raise LlmosError(f"a {config.arch} model of this config cannot be built (dim {config.dim}, ffn_dim "
                             f"{config.ffn_dim}, n_heads {config.n_heads}, vocab_size {config.vocab_size}): {exc}") from None


# --- named transforms ---------------------------------------------------------------------------

def unpermute_gguf_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs -> Hugging Face rotate-half)."""
    shape = w.shape
    # (H, D/2, 2, ...) -> (H, 2, D/2, ...): pairs (x0, x1) become halves.
    return w.reshape(n_heads, shape[0] // n_heads // 2, 2, *shape[1:]).transpose(1, 2).reshape(shape)


def gemma_norm_from_gguf(w: torch.Tensor) -> torch.Tensor:
    """llama.cpp stores Gemma's RMSNorm scale (1 + weight); the model file holds the weight."""
    return w - 1.0


def gemma_norm(w: torch.Tensor) -> torch.Tensor:
    """Gemma's RMSNorm scales by (1 + w); its model file holds the multiplier (as GGUF files store it)."""
    return w.float() + 1.0


def fuse(parts: Iterable[torch.Tensor]) -> torch.Tensor:
    """Stack projections along the output dimension (q/k/v -> wqkv, gate/up -> w13)."""
    return torch.cat(list(parts), dim=0)


# (fused canonical name, its parts) for the Llama family.
LLAMA_FUSIONS = (
    ("attn.wqkv.weight", ("attn.q.weight", "attn.k.weight", "attn.v.weight")),
    ("attn.wqkv.bias", ("attn.q.bias", "attn.k.bias", "attn.v.bias")),
    ("mlp.w13.weight", ("mlp.w1.weight", "mlp.w3.weight")),
)


# A hook that turns one loaded Linear into a faster form as it loads (llmos/quant.py supplies it):
# (module name, fp32 weight, bias, exact GGUF blocks or None) -> replacement module. The blocks are
# () when the file keeps the weight in more than 4 bits (a 4-bit form then keeps 8).
LinearHook = Callable[[str, torch.Tensor, "torch.Tensor | None", "tuple[torch.Tensor, ...] | None"], nn.Module]

# A hook that builds a layer over a GGUF file's own blocks (the "gguf" form, llmos/gguf_linear.py):
# (module name, [(blocks (rows, row_bytes) uint8, GGML type) per source tensor, in output order], bias)
# -> the layer, or None when it does not run those types (the weight then loads dequantized). Called
# with "embed" for the token table: the layer returned must offer `embedding(tied)`.
BlocksHook = Callable[[str, "list[tuple[torch.Tensor, int]]", "torch.Tensor | None"], "nn.Module | None"]


# --- checks before anything is allocated ----------------------------------------------------------

_LAYER = re.compile(r"layers\.(\d+)\.")
# llmos config fields as the formats name them, for messages that point at the value to fix
_FIELD_NAMES = {"n_layers": "block_count / num_hidden_layers", "vocab_size": "vocab_size",
                "dim": "embedding_length / hidden_size", "ffn_dim": "feed_forward_length / intermediate_size",
                "max_seq_len": "context_length / max_position_embeddings", "n_heads": "head_count / num_attention_heads",
                "n_kv_heads": "head_count_kv / num_key_value_heads", "head_size": "key_length / head_dim"}


def canonical_names(config: ModelConfig, source_names: list[str], name_map: names.NameMap, origin: str) -> dict[str, str]:
    """Canonical name -> source name, refusing unknown and duplicated tensors, and a config whose layer
    count is not the file's: checked before a model of that many layers is ever built."""
    canonical: dict[str, str] = {}
    for src in source_names:
        try:
            dst = name_map.rename(src)
        except KeyError:
            raise LlmosError(f"{origin}: unexpected tensor {src!r} for a {config.arch} model; is this the right file?") from None
        if dst in canonical:
            raise LlmosError(f"{origin}: tensors {canonical[dst]!r} and {src!r} are the same weight ({dst}); "
                             "the checkpoint is corrupt")
        if dst is not None:
            canonical[dst] = src
    layers = {int(m.group(1)) for dst in canonical if (m := _LAYER.match(dst))}
    if len(layers) != config.n_layers or (layers and max(layers) != config.n_layers - 1):  # never range(n): n is untrusted
        held = f"layers {min(layers)}..{max(layers)} ({len(layers)} in all)" if layers else "no layers"
        raise LlmosError(f"{origin}: the config's n_layers ({_FIELD_NAMES['n_layers']}) is {config.n_layers}, but the "
                         f"file holds tensors for {held}; the config and the weights disagree")
    return canonical


def check_shapes(model: nn.Module, config: ModelConfig, canonical: dict[str, str], shapes: dict[str, tuple[int, ...]],
                 transform: Callable[[str, torch.Tensor], torch.Tensor], origin: str) -> None:
    """Every tensor the (meta-device) model will take has the shape the file stores, after the named
    transforms and fusions: refused in one line naming the config field that disagrees."""
    for key, expected in model.state_dict().items():
        parts = _parts_of(key, canonical)
        if not parts:
            continue  # missing: _assemble names it
        try:
            got = _fused_shape([transform(p, torch.empty(shapes[canonical[p]], device="meta")).shape for p in parts])
        except RuntimeError:
            got = None  # parts that cannot be transformed: a mismatch all the same
        if got != expected.shape:
            stored = ", ".join(str(tuple(shapes[canonical[p]])) for p in parts)
            raise LlmosError(f"{origin}: {', '.join(canonical[p] for p in parts)} stored as {stored} does not fit {key} "
                             f"{tuple(expected.shape)} from the config's {_fields_at_fault(config, key, expected.shape, got)}; "
                             "the config and the weights disagree")


def _fused_shape(shapes: list[torch.Size]) -> torch.Size | None:
    """The shape `fuse` gives parts of these shapes (None: they cannot be stacked), worked out rather
    than run on the meta device: torch.cat there imports ~800 modules (68 MB, ~1 s) at first use."""
    if len({s[1:] for s in shapes}) != 1:
        return None
    return torch.Size((sum(s[0] for s in shapes), *shapes[0][1:]))


def _fields_at_fault(config: ModelConfig, key: str, expected: torch.Size, got: torch.Size | None) -> str:
    """The config fields (among those `key`'s shape is made of) whose values differ from the file's."""
    if got is not None and len(got) == len(expected):
        wrong = {e for e, g in zip(expected, got) if e != g}
    else:
        wrong = set(expected)
    hs, qkv = config.head_size, (config.n_heads + 2 * config.n_kv_heads) * config.head_size
    sizes = {"vocab_size": (config.vocab_size,), "ffn_dim": (config.ffn_dim, 2 * config.ffn_dim),  # also fused gate/up
             "n_kv_heads": (config.n_kv_heads * hs, qkv), "head_size": (hs, qkv), "n_heads": (config.n_heads * hs, qkv),
             "max_seq_len": (config.max_seq_len,), "dim": (config.dim, 3 * config.dim)}
    made_of = next(fields for part, fields in (("attn.", ("n_heads", "n_kv_heads", "head_size", "dim")),
                                               ("mlp.", ("ffn_dim", "dim")), ("pos_embed", ("max_seq_len", "dim")),
                                               ("embed", ("vocab_size", "dim")), ("output", ("vocab_size", "dim")),
                                               ("", ("dim",))) if part in key)
    named = [f for f in made_of if wrong & set(sizes[f])] or list(made_of)
    return "; ".join(f"{f} ({_FIELD_NAMES[f]}) = {getattr(config, f)}" for f in named[:3])


def _parts_of(key: str, canonical: dict[str, str]) -> list[str]:
    """The canonical names a model tensor is made of: itself, or the parts fused into it ([]: missing)."""
    if key in canonical:
        return [key]
    for fused, parts in LLAMA_FUSIONS:
        prefix = key[: -len(fused)]
        if key.endswith(fused) and all(prefix + p in canonical for p in parts):
            return [prefix + p for p in parts]
    return []


def _assemble(
    model: nn.Module,
    config: ModelConfig,
    canonical: dict[str, str],
    read: Callable[[str], torch.Tensor],
    transform: Callable[[str, torch.Tensor], torch.Tensor],
    dtype: torch.dtype,
    origin: str,
    linear_hook: LinearHook | None = None,
    read_blocks: Callable[[str], tuple[torch.Tensor, ...] | None] | None = None,
    blocks_hook: BlocksHook | None = None,
    read_raw: Callable[[str], tuple[torch.Tensor, int]] | None = None,
) -> nn.Module:
    canonical = dict(canonical)  # consumed as tensors load: what is left over was not used

    def parts_of(key: str) -> list[str]:
        parts = _parts_of(key, canonical)
        if not parts:
            raise LlmosError(f"{origin}: tensor for {key!r} is missing; the checkpoint is incomplete or of another architecture")
        return parts

    def load(key: str) -> torch.Tensor:
        return fuse(transform(p, read(canonical.pop(p))).to(dtype) for p in parts_of(key)).contiguous()

    def blocks(key: str) -> tuple[torch.Tensor, ...] | None:
        """The exact quantized blocks of a (possibly fused) weight, with the same row transforms."""
        if read_blocks is None:
            return None
        per_part = [read_blocks(canonical[p]) for p in parts_of(key)]
        if any(b == () for b in per_part):
            return ()  # a part keeps more than 4 bits: the whole (fused) weight does
        if any(b is None for b in per_part):
            return None
        return tuple(fuse(transform(p, b[i]) for p, b in zip(parts_of(key), per_part)) for i in range(len(per_part[0])))

    def own_blocks(name: str, key: str, bias: torch.Tensor | None) -> nn.Module | None:
        """The layer `blocks_hook` builds over the file's blocks of `key` (its parts consumed), or None."""
        if blocks_hook is None or read_raw is None:
            return None
        parts = parts_of(key)
        raws = [read_raw(canonical[p]) for p in parts]
        layer = blocks_hook(name, [(transform(p, raw), qtype) for p, (raw, qtype) in zip(parts, raws)], bias)
        if layer is not None:
            for p in parts:
                canonical.pop(p)
        return layer

    state: dict[str, torch.Tensor] = {}
    tied = config.tie_embeddings
    keys = list(model.state_dict().keys())
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)} if linear_hook or blocks_hook else {}
    table = own_blocks("embed", "embed.weight", None) if "embed.weight" in keys else None
    if table is not None:  # the token table stays in the file's blocks; a tied head runs the same ones
        head_too = tied and "output" in linears
        set_module(model, "embed", table.embedding(tied=head_too))
        if head_too:
            set_module(model, "output", table)
            tied = False
        keys = [k for k in keys if k != "embed.weight" and not (head_too and k == "output.weight")]
    for key in keys:
        if key == "output.weight" and tied:
            continue
        module_name, _, leaf = key.rpartition(".")
        if module_name in linears:
            if leaf == "weight":
                has_bias = linears[module_name].bias is not None
                bias = load(module_name + ".bias") if has_bias else None
                layer = own_blocks(module_name, key, bias)
                if layer is None and linear_hook is not None:
                    exact = blocks(key)  # before load(key), which consumes the canonical names
                    layer = linear_hook(module_name, load(key), bias, exact)
                if layer is None:  # the model's own Linear, dequantized weights
                    state[key] = load(key)
                    if has_bias:
                        state[module_name + ".bias"] = bias
                else:
                    set_module(model, module_name, layer)
            continue
        state[key] = load(key)
    if tied and "output" in linears and linear_hook is not None:
        # The head shares the embedding table; in a faster form it gets its own converted copy.
        head = linear_hook("output", state["embed.weight"], None, None)
        if getattr(model, "embed_from_head", None) is not None and hasattr(head, "tied"):
            head = head.tied()  # one converted table serves the head and the embeddings
            model.embed_from_head(head)
            del state["embed.weight"]
        set_module(model, "output", head)
        tied = False
    model.load_state_dict(state, assign=True, strict=False)
    if tied:
        model.tie_weights()
    if config.tie_embeddings and "output.weight" in canonical:
        canonical.pop("output.weight")
    if canonical:
        raise LlmosError(f"{origin}: tensors {sorted(canonical.values())[:5]} were not used by the {config.arch} model")
    missing = [n for n, p in model.named_parameters() if p.is_meta] + [n for n, b in model.named_buffers() if b.is_meta]
    if missing:
        raise LlmosError(f"{origin}: tensors for {missing[:5]} are missing; the checkpoint is incomplete")
    return model.eval()


def load_gguf(
    gguf: GGUFFile, config: ModelConfig, dtype: torch.dtype = torch.float32, linear_hook: LinearHook | None = None,
    blocks_hook: BlocksHook | None = None,
) -> nn.Module:
    """Dequantize a GGUF file's tensors into a model of `config`.

    With `linear_hook`, each Linear is handed over as it loads, with its Q4_1 blocks (d, m, q) when
    the file stores it so, so a 4-bit form can run the file's own weights. With `blocks_hook`, each
    Linear and the token table are first offered as the file's blocks (views of the map), and only
    those the hook declines are dequantized."""
    arch = gguf.metadata.get("general.architecture")
    if config.arch == "gpt2":
        name_map = names.NameMap(names.GGUF_GPT2)
    else:
        name_map = names.NameMap(*names.gguf_table(str(arch)))
    # Only llama.cpp's "llama" architecture stores q/k permuted; qwen2 and others use NEOX order.
    permuted = arch == "llama"

    def transform(dst: str, w: torch.Tensor) -> torch.Tensor:
        if config.arch == "gemma2" and dst.endswith("norm.weight"):
            return gemma_norm_from_gguf(w)
        if permuted and dst.endswith(("attn.q.weight", "attn.q.bias")):
            return unpermute_gguf_qk(w, config.n_heads)
        if permuted and dst.endswith(("attn.k.weight", "attn.k.bias")):
            return unpermute_gguf_qk(w, config.n_kv_heads)
        return w

    def read_blocks(src: str) -> tuple[torch.Tensor, ...] | None:
        """Q4_1 blocks as (d, m, q), Q4_K ones in the same shape (one scale and offset per 32); ()
        for a type of more than 4 bits, which a 4-bit form keeps in 8 (Gemma 3's Q4_K_M file mixes
        Q4_K with Q5_0, Q6_K and Q8_0: requantizing those to 4 bits cost 24% perplexity); None else."""
        info = gguf.tensors[src]
        if info.qtype == Q4_1:
            return q4_1_blocks(gguf.raw(src), info.shape)
        if info.qtype == Q4_K and config.arch == "gemma3":
            return q4_k_blocks(gguf.raw(src), info.shape)
        if info.qtype in WIDE_TYPES and config.arch == "gemma3" and len(info.shape) == 2:
            return ()
        return None

    def read_raw(src: str) -> tuple[torch.Tensor, int]:
        """The tensor's bytes as (rows, row_bytes) uint8 over the map (no copy), and its GGML type."""
        info = gguf.tensors[src]
        return torch.from_numpy(gguf.raw(src)).view(info.shape[0], -1), info.qtype

    origin = str(gguf.path)
    canonical = canonical_names(config, list(gguf.tensors), name_map, origin)
    model = build_model(config)
    check_shapes(model, config, canonical, {n: t.shape for n, t in gguf.tensors.items()}, transform, origin)
    return _assemble(model, config, canonical, gguf.tensor, transform, dtype, origin,
                     linear_hook, read_blocks if linear_hook else None, blocks_hook, read_raw)


def load_hf(
    folder: Path, config: ModelConfig, dtype: torch.dtype = torch.float32, linear_hook: LinearHook | None = None
) -> nn.Module:
    """Load a Hugging Face safetensors folder into a model of `config`."""
    ckpt = SafetensorsCheckpoint(folder)
    if config.arch == "gpt2":
        name_map = names.NameMap(names.HF_GPT2, names.HF_GPT2_IGNORED, strip_prefix="transformer.")
    else:  # the table follows config.json's model_type: Phi-3's fused names, Qwen3's q/k norms, Gemma 2's norms
        name_map = names.NameMap(*names.hf_table(_model_type(folder)))

    def transform(dst: str, w: torch.Tensor) -> torch.Tensor:
        if config.arch == "gpt2" and dst.endswith(names.HF_GPT2_CONV1D):
            return w.t()
        if config.arch == "gemma3" and dst.endswith(names.GEMMA3_NORMS):
            return gemma_norm(w)
        return w

    canonical = canonical_names(config, ckpt.names(), name_map, str(folder))
    model = build_model(config)
    check_shapes(model, config, canonical, ckpt.shapes(), transform, str(folder))
    return _assemble(model, config, canonical, ckpt.tensor, transform, dtype, str(folder), linear_hook)


def _model_type(folder: Path) -> str:
    try:
        return str(json.loads((Path(folder) / "config.json").read_text()).get("model_type", ""))
    except (OSError, ValueError, AttributeError):
        return ""  # read_hf_config has already said what is wrong with it; the Llama table then applies


def read_hf_config(folder: Path) -> ModelConfig:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise LlmosError(f"{folder} has no config.json; a Hugging Face model folder needs config.json and *.safetensors")
    try:
        cfg = json.loads(path.read_text())
    except ValueError as exc:
        raise LlmosError(f"{path} is not valid JSON ({exc})") from exc
    return ModelConfig.from_hf_json(cfg)


def open_gguf_config(gguf: GGUFFile) -> ModelConfig:
    factors = None
    if all(name in gguf.tensors for name in names.GGUF_PHI3_ROPE_FACTORS):  # Phi-3's LongRoPE factors
        factors = tuple(gguf.tensor(name).float().flatten().tolist() for name in names.GGUF_PHI3_ROPE_FACTORS)
    return ModelConfig.from_gguf(gguf.metadata, frozenset(gguf.tensors), factors)


def load_bert(folder: Path, config: ModelConfig, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load a Hugging Face BERT-family safetensors folder into an encoder (models/bert.py)."""
    from llmos.models.bert import Bert  # encoders are loaded only by the embedding task

    if config.arch != "bert":
        raise LlmosError(f"{folder} holds a {config.arch} model, not a BERT-family encoder")
    ckpt = SafetensorsCheckpoint(folder)
    name_map = names.NameMap(names.HF_BERT, names.HF_BERT_IGNORED, strip_prefix="bert.")
    canonical = canonical_names(config, ckpt.names(), name_map, str(folder))
    with torch.device("meta"), _skip_init():
        model = Bert(config)

    def same(dst: str, w: torch.Tensor) -> torch.Tensor:
        return w

    check_shapes(model, config, canonical, ckpt.shapes(), same, str(folder))
    return _assemble(model, config, canonical, ckpt.tensor, same, dtype, str(folder))
