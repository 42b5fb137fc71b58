"""Checkpoint -> model: meta-device init, rename by table, a few named transforms, assign.

The flow for every format: build the model on the meta device (no memory), read each source tensor
once (memory-mapped, dequantized when quantized), rename it with a table from names.py, apply the
named transforms (GGUF q/k un-permutation, Conv1D transpose, q/k/v and gate/up fusion), and hand the
result to `load_state_dict(assign=True)`, so no checkpoint is ever held in memory twice.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from llmos.config import ModelConfig
from llmos.errors import LlmosError
from llmos.models.gpt2 import GPT2
from llmos.models.llama import Llama
from llmos.weights import names
from llmos.weights.gguf import GGUFFile
from llmos.weights.safetensors import SafetensorsCheckpoint

MODEL_FILES: dict[str, type[nn.Module]] = {"llama": Llama, "gpt2": GPT2}


def build_model(config: ModelConfig, device: str | torch.device = "meta") -> nn.Module:
    """An uninitialised model of the config's family (on the meta device: no memory)."""
    cls = MODEL_FILES.get(config.arch)
    if cls is None:
        raise LlmosError(f"no causal language model file for architecture {config.arch!r}")
    with torch.device(device):
        return cls(config)


# --- named transforms ---------------------------------------------------------------------------

def unpermute_gguf_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs -> Hugging Face rotate-half)."""
    shape = w.shape
    # (H, D/2, 2, ...) -> (H, 2, D/2, ...): pairs (x0, x1) become halves.
    return w.reshape(n_heads, shape[0] // n_heads // 2, 2, *shape[1:]).transpose(1, 2).reshape(shape)


def fuse(parts: Iterable[torch.Tensor]) -> torch.Tensor:
    """Stack projections along the output dimension (q/k/v -> wqkv, gate/up -> w13)."""
    return torch.cat(list(parts), dim=0)


# (fused canonical name, its parts) for the Llama family.
LLAMA_FUSIONS = (
    ("attn.wqkv.weight", ("attn.q.weight", "attn.k.weight", "attn.v.weight")),
    ("attn.wqkv.bias", ("attn.q.bias", "attn.k.bias", "attn.v.bias")),
    ("mlp.w13.weight", ("mlp.w1.weight", "mlp.w3.weight")),
)


def _assemble(
    model: nn.Module,
    config: ModelConfig,
    source_names: list[str],
    name_map: names.NameMap,
    read: Callable[[str], torch.Tensor],
    transform: Callable[[str, torch.Tensor], torch.Tensor],
    dtype: torch.dtype,
    origin: str,
) -> nn.Module:
    canonical: dict[str, str] = {}
    for src in source_names:
        try:
            dst = name_map.rename(src)
        except KeyError:
            raise LlmosError(f"{origin}: unexpected tensor {src!r} for a {config.arch} model; is this the right file?") from None
        if dst is not None:
            canonical[dst] = src

    def load(dst: str) -> torch.Tensor:
        return transform(dst, read(canonical.pop(dst))).to(dtype).contiguous()

    state: dict[str, torch.Tensor] = {}
    expected = model.state_dict().keys()
    for key in expected:
        if key == "output.weight" and config.tie_embeddings:
            continue
        if key in canonical:
            state[key] = load(key)
            continue
        for fused, parts in LLAMA_FUSIONS:
            prefix = key[: -len(fused)]
            if key.endswith(fused) and all(prefix + p in canonical for p in parts):
                state[key] = fuse(load(prefix + p) for p in parts)
                break
        else:
            raise LlmosError(f"{origin}: tensor for {key!r} is missing; the checkpoint is incomplete or of another architecture")
    model.load_state_dict(state, assign=True, strict=not config.tie_embeddings)
    model.tie_weights()
    if config.tie_embeddings and "output.weight" in canonical:
        canonical.pop("output.weight")
    if canonical:
        raise LlmosError(f"{origin}: tensors {sorted(canonical.values())[:5]} were not used by the {config.arch} model")
    return model.eval()


def load_gguf(gguf: GGUFFile, config: ModelConfig, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Dequantize a GGUF file's tensors into a model of `config`."""
    arch = gguf.metadata.get("general.architecture")
    if config.arch == "llama":
        name_map = names.NameMap(names.GGUF_LLAMA, names.GGUF_LLAMA_IGNORED)
    else:
        name_map = names.NameMap(names.GGUF_GPT2)
    # Only llama.cpp's "llama" architecture stores q/k permuted; qwen2 and others use NEOX order.
    permuted = arch == "llama"

    def transform(dst: str, w: torch.Tensor) -> torch.Tensor:
        if permuted and dst.endswith(("attn.q.weight", "attn.q.bias")):
            return unpermute_gguf_qk(w, config.n_heads)
        if permuted and dst.endswith(("attn.k.weight", "attn.k.bias")):
            return unpermute_gguf_qk(w, config.n_kv_heads)
        return w

    model = build_model(config)
    return _assemble(model, config, list(gguf.tensors), name_map, gguf.tensor, transform, dtype, str(gguf.path))


def load_hf(folder: Path, config: ModelConfig, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load a Hugging Face safetensors folder into a model of `config`."""
    ckpt = SafetensorsCheckpoint(folder)
    if config.arch == "llama":
        name_map = names.NameMap(names.HF_LLAMA, names.HF_LLAMA_IGNORED)
    else:
        name_map = names.NameMap(names.HF_GPT2, names.HF_GPT2_IGNORED, strip_prefix="transformer.")

    def transform(dst: str, w: torch.Tensor) -> torch.Tensor:
        if config.arch == "gpt2" and dst.endswith(names.HF_GPT2_CONV1D):
            return w.t()
        return w

    model = build_model(config)
    return _assemble(model, config, ckpt.names(), name_map, ckpt.tensor, transform, dtype, str(folder))


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
    return ModelConfig.from_gguf(gguf.metadata, frozenset(gguf.tensors))
