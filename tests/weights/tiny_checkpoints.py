"""Tiny, valid model files written from scratch (no download, milliseconds): a 2-layer Llama as a GGUF
file and as a Hugging Face safetensors folder, with a 258-token byte-level vocabulary. The hardening
and fuzz tests start from these and break them."""

from __future__ import annotations

import json
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SHAPE = {"n_layers": 2, "dim": 32, "heads": 4, "kv": 2, "ffn": 64, "ctx": 128}


def byte_tokens() -> list[str]:
    from llmos.tokenizer import _byte_alphabet

    return sorted(_byte_alphabet(), key=_byte_alphabet().get) + ["<|im_start|>", "<|im_end|>"]


def llama_tensors(vocab: int, n_layers: int, dim: int, heads: int, kv: int, ffn: int, seed: int = 0,
                  names: str = "gguf") -> dict[str, np.ndarray]:
    """Random fp32 weights under GGUF or Hugging Face names, in PyTorch (rows, cols) order."""
    rng = np.random.default_rng(seed)
    hd = dim // heads
    per_layer = {"attn_norm": (dim,), "attn_q": (heads * hd, dim), "attn_k": (kv * hd, dim), "attn_v": (kv * hd, dim),
                 "attn_output": (dim, heads * hd), "ffn_norm": (dim,), "ffn_gate": (ffn, dim), "ffn_up": (ffn, dim),
                 "ffn_down": (dim, ffn)}
    hf = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    out = {("token_embd.weight" if names == "gguf" else "model.embed_tokens.weight"): (vocab, dim),
           ("output_norm.weight" if names == "gguf" else "model.norm.weight"): (dim,)}
    for i in range(n_layers):
        for short, shape in per_layer.items():
            out[f"blk.{i}.{short}.weight" if names == "gguf" else f"model.layers.{i}.{hf[short]}.weight"] = shape
    return {n: (rng.standard_normal(s) * 0.05).astype(np.float32) for n, s in out.items()}


def write_gguf(path: Path, metadata: dict[str, Any] | None = None, seed: int = 0, shape: dict[str, int] | None = None,
               encode: Callable[[str, np.ndarray], tuple[np.ndarray, Any]] | None = None) -> Path:
    """A loadable 2-layer Llama GGUF (tied output head); `metadata` overrides llama.* keys by short name
    (the header only: a mismatch with the tensors is the point of some tests); `shape` overrides
    SHAPE's sizes for both; `encode(name, fp32)` -> (data, GGML type or None) stores a tensor in
    another type (quantized blocks as uint8 (rows, row_bytes))."""
    import gguf

    sizes = {**SHAPE, **(shape or {})}
    s = {**sizes, **(metadata or {})}
    tokens = byte_tokens()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(s["n_layers"])
    w.add_embedding_length(s["dim"])
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv"])
    w.add_feed_forward_length(s["ffn"])
    w.add_context_length(s["ctx"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([1] * 256 + [3, 3])
    w.add_token_merges([])
    w.add_bos_token_id(256)
    w.add_eos_token_id(257)
    w.add_chat_template(TEMPLATE)
    for name, arr in llama_tensors(len(tokens), **{k: sizes[k] for k in ("n_layers", "dim", "heads", "kv", "ffn")},
                                   seed=seed).items():
        data, qtype = encode(name, arr) if encode else (arr, None)
        if qtype is None:
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=gguf.GGMLQuantizationType(qtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_hf(folder: Path, config: dict[str, Any] | None = None, seed: int = 0) -> Path:
    """The same model as a Hugging Face folder: config.json, model.safetensors, tokenizer.json."""
    from safetensors.numpy import save_file

    from llmos.tokenizer import Tokenizer
    from llmos.weights.gguf import GGUFFile

    folder.mkdir(parents=True, exist_ok=True)
    tokens = byte_tokens()
    base = {"model_type": "llama", "vocab_size": len(tokens), "hidden_size": SHAPE["dim"],
            "num_hidden_layers": SHAPE["n_layers"], "num_attention_heads": SHAPE["heads"],
            "num_key_value_heads": SHAPE["kv"], "intermediate_size": SHAPE["ffn"],
            "max_position_embeddings": SHAPE["ctx"], "tie_word_embeddings": True, "hidden_act": "silu"}
    (folder / "config.json").write_text(json.dumps({**base, **(config or {})}))
    save_file(llama_tensors(len(tokens), **{k: SHAPE[k] for k in ("n_layers", "dim", "heads", "kv", "ffn")},
                            seed=seed, names="hf"), str(folder / "model.safetensors"))
    gguf_path = folder / "tok.gguf"
    with GGUFFile(write_gguf(gguf_path)) as g:
        tok = Tokenizer.from_gguf(g.metadata)
    gguf_path.unlink()
    tok.backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                                                              "chat_template": TEMPLATE}))
    return folder
