"""Model -> files other tools load: a Hugging Face folder, or a GGUF file (F16 or Q8_0).

The inverse of weights/load.py, built from the same name tables: the model's state dict (merged
first if it carries LoRA adapters) has its fused projections split back (wqkv -> q/k/v, w13 ->
gate/up), is renamed by the inverted table of names.py, and gets the inverse transforms (GPT-2's
Conv1D transpose for Hugging Face; llama.cpp's q/k row permutation for GGUF arch "llama").

Each family is written as its own format names it: Qwen3 (q/k norms), Phi-3 (fused qkv and gate/up,
LongRoPE factors: as metadata in config.json, as the rope_factors_short/long tensors in GGUF), Gemma 2
(llama.cpp stores its norms as 1 + weight) and Gemma 3 (Gemma3ForCausalLM, model_type gemma3_text, whose
norms Hugging Face stores as w of the (1 + w) gemma3.py holds; GGUF arch gemma3 stores 1 + w). A
family or a config a format cannot carry is refused in one line, never written as another family.

Contract:
- `save_hf(model, config, tokenizer, folder)` writes config.json, model.safetensors (unfused Hugging
  Face names), tokenizer.json, tokenizer_config.json, chat_template.jinja and generation_config.json.
  transformers' `AutoModelForCausalLM.from_pretrained(folder)` gives the same logits as the model,
  and so does `llmos.load(folder)`. model.safetensors is renamed into place before config.json, so a
  folder that has a config.json has complete weights.
- `save_gguf(model, config, tokenizer, path, qtype="f16"|"q8_0")` writes one GGUF file (with the
  tokenizer and chat template inside) that `llmos.load(path)` runs. Q8_0 applies to 2-D weights whose
  rows split into 32-value blocks; other 2-D weights are F16 and 1-D tensors (norms, biases) F32, as
  llama.cpp does. Byte-level BPE tokenizers are written as GGUF tokenizer model "gpt2", SentencePiece
  BPE ones (Llama 2, Phi-3, Gemma) as "llama"; llmos, transformers and gguf-py read them back alike.
Both write to a temporary name in the destination folder, fsync and rename: a crash leaves either
the old file or the new one.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from llmos.config import ModelConfig
from llmos.errors import LlmosError
from llmos.files import commit, write_atomically
from llmos.models.lora import merged_state_dict
from llmos.tokenizer import Tokenizer
from llmos.weights import names
from llmos.weights.load import LLAMA_FUSIONS

GGUF_QTYPES = ("f16", "q8_0")


# --- named transforms (inverses of load.py's) ---------------------------------------------------

def permute_gguf_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's q/k row permutation (Hugging Face rotate-half -> interleaved RoPE pairs);
    the inverse of load.unpermute_gguf_qk."""
    shape = w.shape
    # (H, 2, D/2, ...) -> (H, D/2, 2, ...): halves become interleaved pairs.
    return w.reshape(n_heads, 2, shape[0] // n_heads // 2, *shape[1:]).transpose(1, 2).reshape(shape)


def gemma_norm_to_gguf(w: torch.Tensor) -> torch.Tensor:
    """The inverse of load.gemma_norm_from_gguf: llama.cpp's Gemma norms hold 1 + weight."""
    return w + 1.0


def gemma3_norm_to_hf(w: torch.Tensor) -> torch.Tensor:
    """The inverse of load.gemma_norm: gemma3.py holds the multiplier (1 + w), Hugging Face files w."""
    return w - 1.0


def split_fused(state: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Canonical state with fused projections split into their parts (the inverse of load.fuse);
    Phi-3's formats keep them fused."""
    if config.arch not in ("llama", "gemma2", "gemma3") or hf_model_type(config) == "phi3":
        return dict(state)
    hd = config.head_size
    sizes = {
        "attn.wqkv": [config.n_heads * hd, config.n_kv_heads * hd, config.n_kv_heads * hd],
        "mlp.w13": [config.ffn_dim, config.ffn_dim],
    }
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for fused, parts in LLAMA_FUSIONS:
            if key.endswith(fused):
                prefix = key[: -len(fused)]
                pieces = value.split(sizes[fused.rsplit(".", 1)[0]], dim=0)
                out.update({prefix + p: t for p, t in zip(parts, pieces)})
                break
        else:
            out[key] = value
    return out


class _Inverse:
    """An inverted names.py table (canonical name -> source-format name), compiled by names.NameMap."""

    def __init__(self, table: dict[str, str], prefix: str = "") -> None:
        self._map = names.NameMap({dst: src for src, dst in table.items()})
        self.prefix = prefix

    def rename(self, name: str) -> str:
        try:
            return self.prefix + self._map.rename(name)
        except KeyError:
            raise LlmosError(f"no export name for parameter {name!r}") from None


def _plain_state(model: nn.Module, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Model parameters (merged, detached, fp32 on CPU) without the tied head."""
    state = {k: v.detach().float().cpu() for k, v in merged_state_dict(model).items()}
    if config.tie_embeddings:
        state.pop("output.weight", None)
    return state


# --- Hugging Face -------------------------------------------------------------------------------

def hf_model_type(config: ModelConfig) -> str:
    if config.arch in ("gpt2", "gemma2"):
        return config.arch
    if config.arch == "gemma3":
        return "gemma3_text"
    if config.arch != "llama":  # every other family would be written as a Llama's names and config
        raise LlmosError(f"export of {config.arch} models is not supported")
    if config.qk_norm:
        return "qwen3"
    if config.rotary_dim != config.head_size or (config.rope_scaling or {}).get("rope_type") == "longrope":
        return "phi3"
    if config.sliding_window is not None:
        return "mistral"
    return "qwen2" if config.qkv_bias else "llama"


def hf_config(config: ModelConfig, tokenizer: Tokenizer | None = None) -> dict[str, Any]:
    """config.json for `config`, read back identically by ModelConfig.from_hf_json."""
    ids = {}
    if tokenizer is not None:
        ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    if config.arch == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": config.vocab_size, "n_embd": config.dim, "n_layer": config.n_layers,
            "n_head": config.n_heads, "n_inner": config.ffn_dim, "n_positions": config.max_seq_len,
            "n_ctx": config.max_seq_len, "layer_norm_epsilon": config.norm_eps,
            "activation_function": config.act, "tie_word_embeddings": True,
            # llmos trains without dropout; say so, so fine-tuning elsewhere starts alike.
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            "torch_dtype": "float32", **ids,
        }
    model_type = hf_model_type(config)
    if model_type == "gemma2":
        return _gemma2_hf_config(config, ids)
    if model_type == "gemma3_text":
        return _gemma3_hf_config(config, ids)
    arch_name = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "phi3": "Phi3ForCausalLM"}[model_type]
    out: dict[str, Any] = {
        "architectures": [arch_name], "model_type": model_type, **_decoder_fields(config),
        "rope_theta": config.rope_theta, "hidden_act": "silu", "attention_bias": False, **ids,
    }
    if config.head_dim is not None:
        out["head_dim"] = config.head_dim
    if config.rope_scaling is not None:
        out["rope_scaling"] = dict(config.rope_scaling)
    if model_type in ("mistral", "phi3"):
        out["sliding_window"] = config.sliding_window
    if model_type in ("qwen2", "qwen3"):
        out["use_sliding_window"] = False
    if model_type == "phi3":
        if config.rope_scaling is not None:
            out["original_max_position_embeddings"] = config.rope_scaling["original_max_position_embeddings"]
        out["partial_rotary_factor"] = config.rotary_dim / config.head_size
        if out.get("pad_token_id") is None:  # transformers' Phi-3 default (32000) is past a small vocabulary
            out["pad_token_id"] = 0
        out["resid_pdrop"] = out["embd_pdrop"] = 0.0
    return out


def _decoder_fields(config: ModelConfig) -> dict[str, Any]:
    """The config.json keys every RMSNorm decoder (Llama's, Gemma 2's, Gemma 3's) names alike: what
    config._hf_decoder_fields reads back."""
    return {
        "vocab_size": config.vocab_size, "hidden_size": config.dim, "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.n_layers, "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads, "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps, "tie_word_embeddings": config.tie_embeddings, "torch_dtype": "float32",
    }


def _int_if_whole(x: float | None) -> float | int | None:
    return int(x) if x is not None and float(x).is_integer() else x  # transformers types some of these int


def _gemma2_hf_config(config: ModelConfig, ids: dict[str, Any]) -> dict[str, Any]:
    return {
        "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", **_decoder_fields(config),
        "head_dim": config.head_size, "rope_theta": config.rope_theta,
        "hidden_activation": "gelu_pytorch_tanh" if config.act == "gelu_new" else "gelu", "attention_bias": False,
        "sliding_window": config.sliding_window, "layer_types": list(config.layer_types or ()),
        "query_pre_attn_scalar": _int_if_whole(config.query_pre_attn_scalar),
        "attn_logit_softcapping": config.attn_softcap, "final_logit_softcapping": config.final_softcap, **ids,
    }


def _gemma3_hf_config(config: ModelConfig, ids: dict[str, Any]) -> dict[str, Any]:
    # transformers 5's rope_parameters, one entry per layer kind; the global layers carry any scaling.
    full = {"rope_type": "default", **(config.rope_scaling or {}), "rope_theta": config.rope_theta}
    return {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", **_decoder_fields(config),
        "head_dim": config.head_size, "hidden_activation": "gelu_pytorch_tanh", "attention_bias": config.qkv_bias,
        "sliding_window": config.sliding_window,
        "layer_types": list(config.layer_types or ("full_attention",) * config.n_layers),
        "query_pre_attn_scalar": _int_if_whole(config.query_pre_attn_scalar),
        "attn_logit_softcapping": None, "final_logit_softcapping": None,
        "rope_parameters": {"full_attention": full,
                            "sliding_attention": {"rope_type": "default", "rope_theta": config.rope_local_theta}},
        **ids,
    }


def hf_state_dict(model: nn.Module, config: ModelConfig) -> dict[str, torch.Tensor]:
    """The model's weights under Hugging Face names and layouts (unfused; GPT-2 in Conv1D (in, out))."""
    state = split_fused(_plain_state(model, config), config)
    if config.arch == "gpt2":
        inverse = _Inverse(names.HF_GPT2, prefix="transformer.")
    else:
        inverse = _Inverse(names.hf_table(hf_model_type(config))[0])
    out = {}
    for key, value in state.items():
        if config.arch == "gpt2" and key.endswith(names.HF_GPT2_CONV1D):
            value = value.t()
        if config.arch == "gemma3" and key.endswith(names.GEMMA3_NORMS):
            value = gemma3_norm_to_hf(value)
        out[inverse.rename(key)] = value.contiguous()
    return out


def save_tokenizer(tokenizer: Tokenizer, folder: str | Path, max_len: int | None = None) -> None:
    """tokenizer.json, tokenizer_config.json, chat_template.jinja and generation_config.json."""
    folder = Path(folder)
    backend = tokenizer.backend  # the tokenizers.Tokenizer: its JSON is the portable format
    write_atomically(folder / "tokenizer.json", backend.to_str())
    cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    for name, i in (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id), ("pad_token", tokenizer.pad_id)):
        if i is not None:
            cfg[name] = backend.id_to_token(i)
    if max_len:
        cfg["model_max_length"] = max_len
    write_atomically(folder / "tokenizer_config.json", json.dumps(cfg, indent=2, ensure_ascii=False))
    if tokenizer.chat_template:
        write_atomically(folder / "chat_template.jinja", tokenizer.chat_template)
    # Every id that ends a turn, so llmos and transformers both stop on them.
    stops = ([tokenizer.eos_id] if tokenizer.eos_id is not None else []) + sorted(tokenizer.stop_ids - {tokenizer.eos_id})
    gen = {"bos_token_id": tokenizer.bos_id, "eos_token_id": stops or None}
    write_atomically(folder / "generation_config.json", json.dumps({k: v for k, v in gen.items() if v is not None}, indent=2))


def save_hf(model: nn.Module, config: ModelConfig, tokenizer: Tokenizer | None, folder: str | Path) -> Path:
    """Write a Hugging Face model folder; returns it."""
    folder = Path(folder)
    meta = hf_config(config, tokenizer)  # first: a family export cannot write is refused before any file
    folder.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        save_tokenizer(tokenizer, folder, config.max_seq_len)
    tmp = folder / f".model.safetensors.tmp-{os.getpid()}"
    save_file(hf_state_dict(model, config), str(tmp), metadata={"format": "pt"})
    commit(tmp, folder / "model.safetensors")
    write_atomically(folder / "config.json", json.dumps(meta, indent=2))
    return folder


# --- GGUF ---------------------------------------------------------------------------------------

def gguf_arch(config: ModelConfig) -> str:
    if config.arch == "gpt2":
        return "gpt2"
    if config.arch == "gemma2":
        head = config.dim // config.n_heads if config.n_layers == 46 else config.head_size
        if config.query_pre_attn_scalar != head or config.layer_types != tuple(
                "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(config.n_layers)):
            raise LlmosError("GGUF export of this Gemma 2 is not supported: llama.cpp fixes its query scale and layer "
                             "pattern, and this config differs; export --format hf")
        return "gemma2"
    if config.arch == "gemma3":
        _check_llamacpp_gemma3(config)
        return "gemma3"
    if config.arch != "llama":  # every other family would be written as a Llama's names and metadata
        raise LlmosError(f"GGUF export of {config.arch} models is not supported")
    if config.qk_norm:
        return "qwen3"
    if hf_model_type(config) == "phi3":
        return "phi3"
    if config.sliding_window is not None:
        raise LlmosError("GGUF export of sliding-window (Mistral) models is not supported; export --format hf")
    if config.rope_scaling is not None and config.rope_scaling.get("rope_type") != "linear":
        raise LlmosError(f"GGUF export of {config.rope_scaling.get('rope_type')} rope scaling is not supported; export --format hf")
    # llama.cpp's "qwen2" is llama with q/k/v biases and without the q/k permutation.
    return "qwen2" if config.qkv_bias else "llama"


def _check_llamacpp_gemma3(config: ModelConfig) -> None:
    """llama.cpp's gemma3 fixes what this format does not store: every sixth layer global, the local RoPE
    base 10,000, queries scaled by the head size (by dim / n_heads in the 62-layer 27B), a tied head
    and no biases (weights/config.py reads a gemma3 file so). A config that differs is refused."""
    scalar = config.dim // config.n_heads if config.n_layers == 62 else config.head_size
    pattern = tuple("sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(config.n_layers))
    scaling = (config.rope_scaling or {}).get("rope_type", "linear")
    if config.query_pre_attn_scalar != scalar or config.layer_types != pattern or config.rope_local_theta != 10_000.0 \
            or scaling != "linear" or not config.tie_embeddings or config.qkv_bias:
        raise LlmosError("GGUF export of this Gemma 3 is not supported: llama.cpp fixes its query scale, layer pattern, "
                         "local RoPE base and tied head (linear rope scaling only), and this config differs; export --format hf")


def gguf_tensors(model: nn.Module, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, fp32 tensor in PyTorch (rows, cols) order), q/k permuted for arch "llama"."""
    arch = gguf_arch(config)
    state = split_fused(_plain_state(model, config), config)
    inverse = _Inverse(names.GGUF_GPT2 if config.arch == "gpt2" else names.gguf_table(arch)[0])
    for key, value in state.items():
        if arch == "gemma2" and key.endswith("norm.weight"):
            value = gemma_norm_to_gguf(value)
        if arch == "llama" and key.endswith(("attn.q.weight", "attn.q.bias")):
            value = permute_gguf_qk(value, config.n_heads)
        elif arch == "llama" and key.endswith(("attn.k.weight", "attn.k.bias")):
            value = permute_gguf_qk(value, config.n_kv_heads)
        yield inverse.rename(key), value


def save_gguf(model: nn.Module, config: ModelConfig, tokenizer: Tokenizer, path: str | Path, qtype: str = "f16") -> Path:
    """Write one GGUF file; returns its path."""
    import gguf

    qtype = qtype.lower()
    if qtype not in GGUF_QTYPES:
        raise LlmosError(f"GGUF type must be one of {', '.join(GGUF_QTYPES)}, got {qtype!r}")
    arch = gguf_arch(config)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), arch)
    writer.add_name(config.name or "llmos")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if qtype == "q8_0" else gguf.LlamaFileType.MOSTLY_F16)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.dim)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.ffn_dim)
    writer.add_head_count(config.n_heads)
    writer.add_vocab_size(config.vocab_size)
    if config.arch == "gpt2":
        writer.add_layer_norm_eps(config.norm_eps)
    else:
        writer.add_head_count_kv(config.n_kv_heads)
        writer.add_layer_norm_rms_eps(config.norm_eps)
        writer.add_rope_freq_base(config.rope_theta)
        writer.add_rope_dimension_count(config.rotary_dim)
        if arch in ("gemma2", "gemma3") or config.head_size != config.dim // config.n_heads:
            writer.add_key_length(config.head_size)  # Gemma readers take 256 when it is absent
            writer.add_value_length(config.head_size)
        if arch == "phi3":
            _add_phi3_rope(writer, config)
        elif config.rope_scaling is not None:
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(config.rope_scaling["factor"]))
        if arch in ("gemma2", "gemma3"):
            writer.add_sliding_window(config.sliding_window or 0)
            if config.attn_softcap is not None:
                writer.add_attn_logit_softcapping(config.attn_softcap)
            if config.final_softcap is not None:
                writer.add_final_logit_softcapping(config.final_softcap)
    _add_gguf_tokenizer(writer, tokenizer, config.vocab_size, arch)
    for name, tensor in gguf_tensors(model, config):
        data = tensor.numpy()
        if data.ndim == 1:
            writer.add_tensor(name, data.astype(np.float32))
        elif qtype == "q8_0" and data.shape[-1] % 32 == 0:
            q = gguf.quants.quantize(data.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, data.astype(np.float16))
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    commit(tmp, path)
    return path


def _add_phi3_rope(writer: Any, config: ModelConfig) -> None:
    """llama.cpp's Phi-3 keys: the window (0: none), and LongRoPE's context, factor and factor tensors."""
    writer.add_sliding_window(config.sliding_window or 0)
    scaling = config.rope_scaling
    if scaling is None:
        return
    writer.add_rope_scaling_orig_ctx_len(int(scaling["original_max_position_embeddings"]))
    writer.add_rope_scaling_attn_factors(float(scaling["attention_factor"]))
    for name, key in zip(names.GGUF_PHI3_ROPE_FACTORS, ("short_factor", "long_factor")):
        writer.add_tensor(name, np.asarray(scaling[key], dtype=np.float32))


def _add_gguf_tokenizer(writer: Any, tokenizer: Tokenizer, vocab_size: int, arch: str) -> None:
    """The tokenizer as llama.cpp writes it: byte-level BPE as model "gpt2" (pieces, types, merges,
    the pre-tokenizer's name), or SentencePiece BPE (byte fallback, spaces as "▁") as model "llama"
    (pieces, types, scores; merges too, except for Gemma, whose files carry none: readers derive them
    from the pieces' order). Both with the BOS/EOS/pad ids, what `encode` adds, and the chat template."""
    spec = json.loads(tokenizer.to_json())
    model = spec.get("model") or {}
    if model.get("type") == "BPE" and "ByteLevel" in json.dumps(spec.get("pre_tokenizer")):
        tokens, types = _gguf_pieces(tokenizer, spec, vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_gguf_pre_name(spec))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(_merge_strings(model))
    elif model.get("type") == "BPE" and model.get("byte_fallback") and _SPM_SPACE in json.dumps(spec.get("normalizer"), ensure_ascii=False):
        _add_gguf_sentencepiece(writer, tokenizer, spec, vocab_size, gemma=arch in ("gemma2", "gemma3"))
    else:
        raise LlmosError("only byte-level BPE and SentencePiece BPE tokenizers can be written into GGUF; "
                         "export --format hf instead")
    for add, i in ((writer.add_bos_token_id, tokenizer.bos_id), (writer.add_eos_token_id, tokenizer.eos_id),
                   (writer.add_pad_token_id, tokenizer.pad_id)):
        if i is not None:
            add(i)
    post = spec.get("post_processor") or {}
    single = post.get("single") or [] if post.get("type") == "TemplateProcessing" else []
    writer.add_add_bos_token(bool(single) and "SpecialToken" in single[0])
    writer.add_add_eos_token(bool(single) and "SpecialToken" in single[-1])
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


_SPM_SPACE = "\u2581"
_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")
_CONTROL_SCORE = -1000.0  # what SentencePiece (and llama.cpp's converter) gives control and user-defined pieces


def _gguf_pieces(tokenizer: Tokenizer, spec: dict[str, Any], vocab_size: int) -> tuple[list[str], list[int]]:
    """Every id's piece and GGUF token type: added special tokens are CONTROL, other added ones
    USER_DEFINED, ids past the tokenizer's vocabulary (the model's padding rows) UNUSED "[PADn]"."""
    import gguf

    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    tokens: list[str | None] = [None] * max(vocab_size, len(vocab))
    for piece, i in vocab.items():
        tokens[i] = piece
    added = {a["id"]: a for a in spec.get("added_tokens") or []}
    types = []
    for i, piece in enumerate(tokens):
        if piece is None:
            tokens[i] = f"[PAD{i}]"
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    return tokens, types  # type: ignore[return-value]  # every None was replaced


def _add_gguf_sentencepiece(writer: Any, tokenizer: Tokenizer, spec: dict[str, Any], vocab_size: int,
                            gemma: bool) -> None:
    """SentencePiece BPE as llama.cpp's converter writes it: `<0xNN>` pieces typed BYTE, the unknown
    piece UNKNOWN, scores as SentencePiece gives them (0 for bytes, -1000 for control and user-defined
    pieces, minus the rank for the others), and the space prefix the normalizer adds. Gemma's pieces of
    two or more spaces are written with real spaces, user-defined, as its files spell them (readers
    respell them "▁"), and its merges are left out as there."""
    import gguf

    model = spec["model"]
    tokens, types = _gguf_pieces(tokenizer, spec, vocab_size)
    for i, piece in enumerate(tokens):
        if types[i] != gguf.TokenType.NORMAL:
            continue
        if _BYTE_PIECE.fullmatch(piece):
            types[i] = gguf.TokenType.BYTE
        elif piece == model.get("unk_token"):
            types[i] = gguf.TokenType.UNKNOWN
        elif gemma and len(piece) > 1 and not piece.strip(_SPM_SPACE):
            tokens[i], types[i] = " " * len(piece), gguf.TokenType.USER_DEFINED
    first = next((i for i, t in enumerate(types) if t == gguf.TokenType.NORMAL), 0)
    unscored = (gguf.TokenType.BYTE, gguf.TokenType.UNKNOWN, gguf.TokenType.UNUSED)
    scores = [float(first - i) if t == gguf.TokenType.NORMAL else 0.0 if t in unscored else _CONTROL_SCORE
              for i, t in enumerate(types)]
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_scores(scores)
    if not gemma:
        writer.add_token_merges(_merge_strings(model))
    unk = tokenizer.backend.token_to_id(model["unk_token"]) if model.get("unk_token") else None
    if unk is not None:
        writer.add_unk_token_id(unk)
    writer.add_add_space_prefix("Prepend" in json.dumps(spec.get("normalizer")))


def _merge_strings(model: dict[str, Any]) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]


def _gguf_pre_name(spec: dict[str, Any]) -> str:
    """The `tokenizer.ggml.pre` whose split regexes are this tokenizer's (llmos.tokenizer's table)."""
    from llmos.tokenizer import GGUF_PRE_TOKENIZERS  # the same table the reader uses, so the round trip holds

    pre = spec.get("pre_tokenizer") or {}
    ignore_merges = bool((spec.get("model") or {}).get("ignore_merges", False))
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        splits: tuple[str, ...] = (GGUF_PRE_TOKENIZERS["gpt-2"]["splits"][0],)
    elif pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers") or []
        splits = tuple((p.get("pattern") or {}).get("Regex", "") for p in parts if p.get("type") == "Split")
    else:
        splits = ()
    for name, entry in GGUF_PRE_TOKENIZERS.items():
        if entry["splits"] == splits and entry["ignore_merges"] == ignore_merges:
            return name
    raise LlmosError("this tokenizer's pre-tokenizer has no GGUF equivalent llmos knows; export --format hf instead")
