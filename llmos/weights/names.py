"""Name maps from checkpoint formats to llmos parameter names, as literal tables.

Each table maps a source tensor name to a canonical llmos name; "{i}" stands for the layer index.
Canonical names are the model files' parameter names, except that fused projections appear as their
parts (attn.q/k/v, mlp.w1/w3), which weights/load.py fuses. A name absent from its table is either
listed in the table's IGNORED set or an error: nothing is dropped silently.
"""

from __future__ import annotations

import re

HF_LLAMA: dict[str, str] = {
    "model.embed_tokens.weight": "embed.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "layers.{i}.attn.q.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "layers.{i}.attn.k.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "layers.{i}.attn.v.weight",
    "model.layers.{i}.self_attn.q_proj.bias": "layers.{i}.attn.q.bias",
    "model.layers.{i}.self_attn.k_proj.bias": "layers.{i}.attn.k.bias",
    "model.layers.{i}.self_attn.v_proj.bias": "layers.{i}.attn.v.bias",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.attn.wo.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.mlp_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "layers.{i}.mlp.w1.weight",
    "model.layers.{i}.mlp.up_proj.weight": "layers.{i}.mlp.w3.weight",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.mlp.w2.weight",
}
HF_LLAMA_IGNORED = {"model.layers.{i}.self_attn.rotary_emb.inv_freq"}

GGUF_LLAMA: dict[str, str] = {
    "token_embd.weight": "embed.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
    "blk.{i}.attn_norm.weight": "layers.{i}.attn_norm.weight",
    "blk.{i}.attn_q.weight": "layers.{i}.attn.q.weight",
    "blk.{i}.attn_k.weight": "layers.{i}.attn.k.weight",
    "blk.{i}.attn_v.weight": "layers.{i}.attn.v.weight",
    "blk.{i}.attn_q.bias": "layers.{i}.attn.q.bias",
    "blk.{i}.attn_k.bias": "layers.{i}.attn.k.bias",
    "blk.{i}.attn_v.bias": "layers.{i}.attn.v.bias",
    "blk.{i}.attn_output.weight": "layers.{i}.attn.wo.weight",
    "blk.{i}.ffn_norm.weight": "layers.{i}.mlp_norm.weight",
    "blk.{i}.ffn_gate.weight": "layers.{i}.mlp.w1.weight",
    "blk.{i}.ffn_up.weight": "layers.{i}.mlp.w3.weight",
    "blk.{i}.ffn_down.weight": "layers.{i}.mlp.w2.weight",
}
GGUF_LLAMA_IGNORED = {"rope_freqs.weight"}

# Qwen3: Llama's names plus per-head q/k norms (llama.cpp: arch "qwen3", no q/k permutation).
HF_QWEN3: dict[str, str] = {
    **HF_LLAMA,
    "model.layers.{i}.self_attn.q_norm.weight": "layers.{i}.attn.q_norm.weight",
    "model.layers.{i}.self_attn.k_norm.weight": "layers.{i}.attn.k_norm.weight",
}
GGUF_QWEN3: dict[str, str] = {
    **GGUF_LLAMA,
    "blk.{i}.attn_q_norm.weight": "layers.{i}.attn.q_norm.weight",
    "blk.{i}.attn_k_norm.weight": "layers.{i}.attn.k_norm.weight",
}

# Phi-3 stores q/k/v and gate/up already fused, in llmos' order (q, k, v rows; gate rows, then up).
HF_PHI3: dict[str, str] = {
    "model.embed_tokens.weight": "embed.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attn_norm.weight",
    "model.layers.{i}.self_attn.qkv_proj.weight": "layers.{i}.attn.wqkv.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.attn.wo.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.mlp_norm.weight",
    "model.layers.{i}.mlp.gate_up_proj.weight": "layers.{i}.mlp.w13.weight",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.mlp.w2.weight",
}
GGUF_PHI3: dict[str, str] = {
    "token_embd.weight": "embed.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
    "blk.{i}.attn_norm.weight": "layers.{i}.attn_norm.weight",
    "blk.{i}.attn_qkv.weight": "layers.{i}.attn.wqkv.weight",
    "blk.{i}.attn_output.weight": "layers.{i}.attn.wo.weight",
    "blk.{i}.ffn_norm.weight": "layers.{i}.mlp_norm.weight",
    "blk.{i}.ffn_up.weight": "layers.{i}.mlp.w13.weight",  # llama.cpp keeps gate/up fused under ffn_up
    "blk.{i}.ffn_down.weight": "layers.{i}.mlp.w2.weight",
}
# LongRoPE's factors live in these tensors; weights/load.py reads them into the config.
GGUF_PHI3_ROPE_FACTORS = ("rope_factors_short.weight", "rope_factors_long.weight")

# Gemma 2: four norms a block. Hugging Face's post_attention_layernorm is the norm *after* attention
# here (Llama's name for the pre-MLP norm), pre_feedforward_layernorm the pre-MLP one.
HF_GEMMA2: dict[str, str] = {
    "model.embed_tokens.weight": "embed.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "layers.{i}.attn.q.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "layers.{i}.attn.k.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "layers.{i}.attn.v.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.attn.wo.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.post_attn_norm.weight",
    "model.layers.{i}.pre_feedforward_layernorm.weight": "layers.{i}.mlp_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "layers.{i}.mlp.w1.weight",
    "model.layers.{i}.mlp.up_proj.weight": "layers.{i}.mlp.w3.weight",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.mlp.w2.weight",
    "model.layers.{i}.post_feedforward_layernorm.weight": "layers.{i}.post_mlp_norm.weight",
}
# llama.cpp stores Gemma's norm weights as 1 + weight (weights/load.py and export.py convert).
GGUF_GEMMA2: dict[str, str] = {
    "token_embd.weight": "embed.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
    "blk.{i}.attn_norm.weight": "layers.{i}.attn_norm.weight",
    "blk.{i}.attn_q.weight": "layers.{i}.attn.q.weight",
    "blk.{i}.attn_k.weight": "layers.{i}.attn.k.weight",
    "blk.{i}.attn_v.weight": "layers.{i}.attn.v.weight",
    "blk.{i}.attn_output.weight": "layers.{i}.attn.wo.weight",
    "blk.{i}.post_attention_norm.weight": "layers.{i}.post_attn_norm.weight",
    "blk.{i}.ffn_norm.weight": "layers.{i}.mlp_norm.weight",
    "blk.{i}.ffn_gate.weight": "layers.{i}.mlp.w1.weight",
    "blk.{i}.ffn_up.weight": "layers.{i}.mlp.w3.weight",
    "blk.{i}.ffn_down.weight": "layers.{i}.mlp.w2.weight",
    "blk.{i}.post_ffw_norm.weight": "layers.{i}.post_mlp_norm.weight",
}


def hf_table(model_type: str) -> tuple[dict[str, str], set[str]]:
    """The (table, ignored) pair for a decoder's Hugging Face `model_type` (llama-like by default)."""
    return {"qwen3": (HF_QWEN3, HF_LLAMA_IGNORED), "phi3": (HF_PHI3, HF_LLAMA_IGNORED),
            "gemma2": (HF_GEMMA2, set()), "gemma3_text": (HF_GEMMA3, HF_GEMMA3_IGNORED)}.get(model_type, (HF_LLAMA, HF_LLAMA_IGNORED))


def gguf_table(arch: str) -> tuple[dict[str, str], set[str]]:
    """The (table, ignored) pair for a decoder's GGUF `general.architecture` (llama-like by default)."""
    return {"qwen3": (GGUF_QWEN3, GGUF_LLAMA_IGNORED), "phi3": (GGUF_PHI3, set(GGUF_PHI3_ROPE_FACTORS)),
            "gemma2": (GGUF_GEMMA2, set()), "gemma3": (GGUF_GEMMA3, set())}.get(arch, (GGUF_LLAMA, GGUF_LLAMA_IGNORED))


# GPT-2 checkpoints saved from GPT2LMHeadModel prefix these with "transformer."; the loader strips it.
HF_GPT2: dict[str, str] = {
    "wte.weight": "embed.weight",
    "wpe.weight": "pos_embed.weight",
    "ln_f.weight": "norm.weight",
    "ln_f.bias": "norm.bias",
    "h.{i}.ln_1.weight": "layers.{i}.ln_1.weight",
    "h.{i}.ln_1.bias": "layers.{i}.ln_1.bias",
    "h.{i}.attn.c_attn.weight": "layers.{i}.attn.wqkv.weight",
    "h.{i}.attn.c_attn.bias": "layers.{i}.attn.wqkv.bias",
    "h.{i}.attn.c_proj.weight": "layers.{i}.attn.wo.weight",
    "h.{i}.attn.c_proj.bias": "layers.{i}.attn.wo.bias",
    "h.{i}.ln_2.weight": "layers.{i}.ln_2.weight",
    "h.{i}.ln_2.bias": "layers.{i}.ln_2.bias",
    "h.{i}.mlp.c_fc.weight": "layers.{i}.mlp.fc.weight",
    "h.{i}.mlp.c_fc.bias": "layers.{i}.mlp.fc.bias",
    "h.{i}.mlp.c_proj.weight": "layers.{i}.mlp.proj.weight",
    "h.{i}.mlp.c_proj.bias": "layers.{i}.mlp.proj.bias",
}
# The head is tied to wte; old checkpoints also carry the causal-mask buffers.
HF_GPT2_IGNORED = {"lm_head.weight", "h.{i}.attn.bias", "h.{i}.attn.masked_bias"}
# Conv1D stores (in, out): these are transposed into nn.Linear's (out, in).
HF_GPT2_CONV1D = ("attn.wqkv.weight", "attn.wo.weight", "mlp.fc.weight", "mlp.proj.weight")

GGUF_GPT2: dict[str, str] = {
    "token_embd.weight": "embed.weight",
    "position_embd.weight": "pos_embed.weight",
    "output_norm.weight": "norm.weight",
    "output_norm.bias": "norm.bias",
    "output.weight": "output.weight",
    "blk.{i}.attn_norm.weight": "layers.{i}.ln_1.weight",
    "blk.{i}.attn_norm.bias": "layers.{i}.ln_1.bias",
    "blk.{i}.attn_qkv.weight": "layers.{i}.attn.wqkv.weight",
    "blk.{i}.attn_qkv.bias": "layers.{i}.attn.wqkv.bias",
    "blk.{i}.attn_output.weight": "layers.{i}.attn.wo.weight",
    "blk.{i}.attn_output.bias": "layers.{i}.attn.wo.bias",
    "blk.{i}.ffn_norm.weight": "layers.{i}.ln_2.weight",
    "blk.{i}.ffn_norm.bias": "layers.{i}.ln_2.bias",
    "blk.{i}.ffn_up.weight": "layers.{i}.mlp.fc.weight",
    "blk.{i}.ffn_up.bias": "layers.{i}.mlp.fc.bias",
    "blk.{i}.ffn_down.weight": "layers.{i}.mlp.proj.weight",
    "blk.{i}.ffn_down.bias": "layers.{i}.mlp.proj.bias",
}


class NameMap:
    """Compiled form of one table: `rename(source) -> canonical | None` (None: ignored)."""

    def __init__(self, table: dict[str, str], ignored: set[str] = frozenset(), strip_prefix: str = "") -> None:
        self.strip_prefix = strip_prefix
        self._rules = [(_compile(src), dst) for src, dst in table.items()]
        self._ignored = [_compile(src) for src in ignored]

    def rename(self, name: str) -> str | None:
        if self.strip_prefix and name.startswith(self.strip_prefix):
            name = name[len(self.strip_prefix):]
        for pattern, dst in self._rules:
            m = pattern.fullmatch(name)
            if m:
                return dst.replace("{i}", m.group(1)) if m.groups() else dst
        if any(p.fullmatch(name) for p in self._ignored):
            return None
        raise KeyError(name)


def _compile(pattern: str) -> re.Pattern[str]:
    return re.compile(re.escape(pattern).replace(r"\{i\}", r"(\d+)"))

# BERT encoders (BertModel, as sentence-transformers saves them). Checkpoints saved from a task model
# (BertForMaskedLM, ...) prefix these with "bert."; the loader strips it. The pooler and task heads
# are not part of an encoder's hidden states, so sentence embeddings never read them.
HF_BERT: dict[str, str] = {
    "embeddings.word_embeddings.weight": "embeddings.embed.weight",
    "embeddings.position_embeddings.weight": "embeddings.pos_embed.weight",
    "embeddings.token_type_embeddings.weight": "embeddings.type_embed.weight",
    "embeddings.LayerNorm.weight": "embeddings.norm.weight",
    "embeddings.LayerNorm.bias": "embeddings.norm.bias",
    "encoder.layer.{i}.attention.self.query.weight": "layers.{i}.attn.q.weight",
    "encoder.layer.{i}.attention.self.query.bias": "layers.{i}.attn.q.bias",
    "encoder.layer.{i}.attention.self.key.weight": "layers.{i}.attn.k.weight",
    "encoder.layer.{i}.attention.self.key.bias": "layers.{i}.attn.k.bias",
    "encoder.layer.{i}.attention.self.value.weight": "layers.{i}.attn.v.weight",
    "encoder.layer.{i}.attention.self.value.bias": "layers.{i}.attn.v.bias",
    "encoder.layer.{i}.attention.output.dense.weight": "layers.{i}.attn.wo.weight",
    "encoder.layer.{i}.attention.output.dense.bias": "layers.{i}.attn.wo.bias",
    "encoder.layer.{i}.attention.output.LayerNorm.weight": "layers.{i}.attn_norm.weight",
    "encoder.layer.{i}.attention.output.LayerNorm.bias": "layers.{i}.attn_norm.bias",
    "encoder.layer.{i}.intermediate.dense.weight": "layers.{i}.mlp.fc.weight",
    "encoder.layer.{i}.intermediate.dense.bias": "layers.{i}.mlp.fc.bias",
    "encoder.layer.{i}.output.dense.weight": "layers.{i}.mlp.proj.weight",
    "encoder.layer.{i}.output.dense.bias": "layers.{i}.mlp.proj.bias",
    "encoder.layer.{i}.output.LayerNorm.weight": "layers.{i}.mlp_norm.weight",
    "encoder.layer.{i}.output.LayerNorm.bias": "layers.{i}.mlp_norm.bias",
}
HF_BERT_IGNORED = {
    "embeddings.position_ids",
    "pooler.dense.weight",
    "pooler.dense.bias",
    "cls.predictions.bias",
    "cls.predictions.transform.dense.weight",
    "cls.predictions.transform.dense.bias",
    "cls.predictions.transform.LayerNorm.weight",
    "cls.predictions.transform.LayerNorm.bias",
    "cls.predictions.decoder.weight",
    "cls.predictions.decoder.bias",
    "cls.seq_relationship.weight",
    "cls.seq_relationship.bias",
}

# Gemma 3 (Gemma3ForCausalLM). Its norms are four a block; "post_attention_layernorm" is the norm after
# attention here, not Llama's norm before the MLP. Hugging Face norm weights hold w of Gemma's (1 + w),
# GGUF files (1 + w) itself: the loader adds the 1 to HF's (GEMMA3_NORMS).
HF_GEMMA3: dict[str, str] = {
    "model.embed_tokens.weight": "embed.weight",
    "model.norm.weight": "norm.weight",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "layers.{i}.attn.q.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "layers.{i}.attn.k.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "layers.{i}.attn.v.weight",
    "model.layers.{i}.self_attn.q_proj.bias": "layers.{i}.attn.q.bias",
    "model.layers.{i}.self_attn.k_proj.bias": "layers.{i}.attn.k.bias",
    "model.layers.{i}.self_attn.v_proj.bias": "layers.{i}.attn.v.bias",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.attn.wo.weight",
    "model.layers.{i}.self_attn.q_norm.weight": "layers.{i}.attn.q_norm.weight",
    "model.layers.{i}.self_attn.k_norm.weight": "layers.{i}.attn.k_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.post_attn_norm.weight",
    "model.layers.{i}.pre_feedforward_layernorm.weight": "layers.{i}.mlp_norm.weight",
    "model.layers.{i}.post_feedforward_layernorm.weight": "layers.{i}.post_mlp_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "layers.{i}.mlp.w1.weight",
    "model.layers.{i}.mlp.up_proj.weight": "layers.{i}.mlp.w3.weight",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.mlp.w2.weight",
}
HF_GEMMA3_IGNORED = {"lm_head.weight"}  # tied to the embedding
GEMMA3_NORMS = "norm.weight"  # canonical names ending so take the +1 from Hugging Face files

GGUF_GEMMA3: dict[str, str] = {
    "token_embd.weight": "embed.weight",
    "output_norm.weight": "norm.weight",
    "blk.{i}.attn_norm.weight": "layers.{i}.attn_norm.weight",
    "blk.{i}.attn_q.weight": "layers.{i}.attn.q.weight",
    "blk.{i}.attn_k.weight": "layers.{i}.attn.k.weight",
    "blk.{i}.attn_v.weight": "layers.{i}.attn.v.weight",
    "blk.{i}.attn_output.weight": "layers.{i}.attn.wo.weight",
    "blk.{i}.attn_q_norm.weight": "layers.{i}.attn.q_norm.weight",
    "blk.{i}.attn_k_norm.weight": "layers.{i}.attn.k_norm.weight",
    "blk.{i}.post_attention_norm.weight": "layers.{i}.post_attn_norm.weight",
    "blk.{i}.ffn_norm.weight": "layers.{i}.mlp_norm.weight",
    "blk.{i}.post_ffw_norm.weight": "layers.{i}.post_mlp_norm.weight",
    "blk.{i}.ffn_gate.weight": "layers.{i}.mlp.w1.weight",
    "blk.{i}.ffn_up.weight": "layers.{i}.mlp.w3.weight",
    "blk.{i}.ffn_down.weight": "layers.{i}.mlp.w2.weight",
}
