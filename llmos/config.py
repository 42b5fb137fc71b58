"""ModelConfig: the shape of a Transformer, independent of any file format.

Translation from other formats happens here, at the boundary: `from_hf_json` reads a Hugging Face
`config.json` dict, `from_gguf` reads GGUF metadata. Everything downstream sees only this dataclass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from llmos.errors import LlmosError


class ConfigError(LlmosError):
    """A model configuration that llmos cannot run, with the reason and what to do."""


# Hugging Face `model_type` -> llmos architecture family.
_HF_FAMILIES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",  # Qwen2 without q/k/v biases, with q/k RMSNorm (qk_norm)
    "phi3": "llama",  # fused q/k/v and gate/up in the checkpoint, LongRoPE, partial rotary
    "gemma2": "gemma2",
    "gpt2": "gpt2",
    "bert": "bert",
    "gemma3_text": "gemma3",
}
# GGUF `general.architecture` -> llmos architecture family.
_GGUF_FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "phi3": "llama",
                  "gemma2": "gemma2", "gemma3": "gemma3", "gpt2": "gpt2", "bert": "bert"}


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # "llama" | "gemma2" | "gemma3" | "gpt2" | "bert": which model file runs it
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    max_seq_len: int
    norm_eps: float = 1e-5
    head_dim: int | None = None  # None: dim // n_heads
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = field(default=None, compare=False)
    qkv_bias: bool = False  # Qwen2 has biases on q, k and v
    tie_embeddings: bool = False
    act: str = "silu"  # MLP activation: "silu" (SwiGLU), "gelu_new" (GPT-2 tanh), "gelu" (BERT erf)
    sliding_window: int | None = None  # Mistral: attend to at most this many past positions
    type_vocab_size: int = 0  # BERT token types
    qk_norm: bool = False  # Qwen3: RMSNorm over each head's q and k before the rotation
    rope_dim: int | None = None  # Phi-3/4 partial rotary: rotate only the first rope_dim of each head
    # Gemma 2/3: which layers use the sliding window ("sliding_attention") and which see every position
    # ("full_attention"); None: `sliding_window`, if set, applies to every layer (Mistral, Phi-3).
    layer_types: tuple[str, ...] | None = None
    query_pre_attn_scalar: float | None = None  # Gemma: scores scaled by this ** -0.5, not head_size ** -0.5
    attn_softcap: float | None = None  # Gemma 2: attention scores s -> c * tanh(s / c)
    final_softcap: float | None = None  # Gemma 2: logits z -> c * tanh(z / c)
    name: str = ""  # human-readable model name, informational only
    rope_local_theta: float | None = None  # Gemma 3: the sliding layers' RoPE base (rope_theta is the full layers')

    @property
    def head_size(self) -> int:
        return self.head_dim if self.head_dim is not None else self.dim // self.n_heads

    @property
    def rotary_dim(self) -> int:
        """How many leading dims of each head the rotary embedding turns (all, unless partial)."""
        return self.rope_dim if self.rope_dim is not None else self.head_size

    @property
    def rope_switch(self) -> int | None:
        """LongRoPE's original context: a sequence longer than this rotates all its positions with the
        long factors, so keys cached while it was shorter go stale (None: rotation ignores length)."""
        scaling = self.rope_scaling
        if scaling is None or scaling["rope_type"] != "longrope":
            return None
        return int(scaling["original_max_position_embeddings"])

    @property
    def n_rep(self) -> int:
        """Query heads sharing one key/value head (grouped-query attention)."""
        return self.n_heads // self.n_kv_heads

    def __post_init__(self) -> None:
        if isinstance(self.layer_types, list):  # read back from JSON (a run's recipe)
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        for f in fields(self):  # values come from files: types are checked, not trusted
            value = getattr(self, f.name)
            if f.type in ("int", "int | None") and value is not None and (type(value) is not int):
                raise ConfigError(f"model config field {f.name} must be an integer, got {value!r}")
            if f.type in ("float", "float | None") and (value is not None or f.type == "float") and (
                    isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
                raise ConfigError(f"model config field {f.name} must be a finite number, got {value!r}")
        if self.arch not in ("llama", "gemma2", "gemma3", "gpt2", "bert"):
            raise ConfigError(f"unknown architecture {self.arch!r}: llmos runs llama, gemma2, gemma3, gpt2 and bert families")
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"model config field {name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim is None and self.dim % self.n_heads:
            raise ConfigError(f"dim ({self.dim}) must be a multiple of n_heads ({self.n_heads})")
        if self.head_dim is not None and self.head_dim <= 0:
            raise ConfigError(f"model config field head_dim must be positive, got {self.head_dim}")
        if self.rotary_dim % 2 and self.arch in ("llama", "gemma2", "gemma3"):
            raise ConfigError(f"the rotary size ({self.rotary_dim}) must be even for rotary positions")
        if self.rope_dim is not None and not 0 < self.rope_dim <= self.head_size:
            raise ConfigError(f"rope_dim ({self.rope_dim}) must be in 1..head size ({self.head_size})")
        if self.layer_types is not None and (len(self.layer_types) != self.n_layers or not set(self.layer_types)
                                             <= {"sliding_attention", "full_attention"}):
            raise ConfigError(f"layer_types must name sliding_attention or full_attention for each of the "
                              f"{self.n_layers} layers, got {str(self.layer_types)[:80]}")

    @classmethod
    def from_hf_json(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face `config.json` (already parsed)."""
        if not isinstance(cfg, dict):
            raise ConfigError(f"config.json must hold a JSON object, got {type(cfg).__name__}")
        try:
            return cls._from_hf_json(cfg)
        except KeyError as exc:
            raise ConfigError(f"config.json has no {exc.args[0]!r}, which a {cfg.get('model_type')} model needs; "
                              "re-save the model with transformers") from None
        except (TypeError, ValueError, AttributeError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"config.json holds a value of the wrong type ({exc}); re-save the model") from None

    @classmethod
    def _from_hf_json(cls, cfg: dict[str, Any]) -> ModelConfig:
        model_type = cfg.get("model_type")
        family = _HF_FAMILIES.get(model_type if isinstance(model_type, str) else "")
        if family is None:
            raise ConfigError(
                f"model_type {model_type!r} is not supported; llmos runs {', '.join(sorted(_HF_FAMILIES))}"
            )
        if family == "gpt2":
            dim = cfg["n_embd"]
            return cls(
                arch="gpt2",
                vocab_size=cfg["vocab_size"],
                dim=dim,
                n_layers=cfg["n_layer"],
                n_heads=cfg["n_head"],
                n_kv_heads=cfg["n_head"],
                ffn_dim=cfg.get("n_inner") or 4 * dim,
                max_seq_len=cfg["n_positions"],
                norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
                tie_embeddings=True,
                act=_gelu_name(cfg.get("activation_function", "gelu_new")),
                name=cfg.get("_name_or_path", ""),
            )
        if family == "gemma3":
            return _gemma3_from_hf(cls, cfg)
        if family == "bert":
            return cls(
                arch="bert",
                vocab_size=cfg["vocab_size"],
                dim=cfg["hidden_size"],
                n_layers=cfg["num_hidden_layers"],
                n_heads=cfg["num_attention_heads"],
                n_kv_heads=cfg["num_attention_heads"],
                ffn_dim=cfg["intermediate_size"],
                max_seq_len=cfg["max_position_embeddings"],
                norm_eps=cfg.get("layer_norm_eps", 1e-12),
                act=_gelu_name(cfg.get("hidden_act", "gelu")),
                type_vocab_size=cfg.get("type_vocab_size", 2),
                name=cfg.get("_name_or_path", ""),
            )
        n_heads = _positive_heads(cfg["num_attention_heads"], "config.json num_attention_heads")
        rope_theta, scaling, rope_dim = _hf_rope(cfg)
        if family == "gemma2":
            head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_heads
            n_layers = cfg["num_hidden_layers"]
            layer_types = cfg.get("layer_types") or _alternating(n_layers)
            if scaling is not None:
                raise ConfigError(f"rope scaling {scaling['rope_type']!r} is not supported for gemma2")
            return cls(
                arch="gemma2",
                **_hf_decoder_fields(cfg, tied=True),
                max_seq_len=cfg.get("max_position_embeddings", 8192),
                head_dim=cfg.get("head_dim"),
                rope_theta=float(rope_theta),
                act=_gelu_name(cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"),
                sliding_window=cfg.get("sliding_window"),
                layer_types=tuple(layer_types),
                query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar") or head_dim),
                attn_softcap=_float_or_none(cfg.get("attn_logit_softcapping")),
                final_softcap=_float_or_none(cfg.get("final_logit_softcapping")),
            )
        hidden_act = cfg.get("hidden_act", "silu")
        if hidden_act != "silu":
            raise ConfigError(f"hidden_act {hidden_act!r} is not supported for {model_type}; expected 'silu'")
        if model_type == "qwen3" and (cfg.get("attention_bias") or cfg.get("use_sliding_window")):
            raise ConfigError("Qwen3 with attention biases or sliding-window layers is not supported")
        return cls(
            arch="llama",
            **_hf_decoder_fields(cfg, tied=False),
            max_seq_len=cfg.get("max_position_embeddings", 2048),
            head_dim=cfg.get("head_dim"),
            rope_theta=float(rope_theta),
            rope_scaling=scaling,
            qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
            sliding_window=cfg.get("sliding_window") if model_type in ("mistral", "phi3") else None,
            qk_norm=model_type == "qwen3",
            rope_dim=rope_dim,
        )

    @classmethod
    def from_gguf(cls, metadata: dict[str, Any], tensor_names: set[str] | frozenset[str],
                  rope_factors: tuple[list[float], list[float]] | None = None) -> ModelConfig:
        """Build from GGUF metadata; `tensor_names` tells whether the output head is tied and which
        optional tensors exist; `rope_factors` are the (short, long) LongRoPE factors that llama.cpp
        keeps as tensors (rope_factors_short/long.weight) rather than metadata (Phi-3)."""
        arch = metadata.get("general.architecture")
        family = _GGUF_FAMILIES.get(arch if isinstance(arch, str) else "")
        if family is None:
            raise ConfigError(
                f"GGUF architecture {arch!r} is not supported; llmos runs {', '.join(sorted(_GGUF_FAMILIES))}"
            )

        def get(key: str, default: Any = None) -> Any:
            value = metadata.get(f"{arch}.{key}", default)
            if value is None:
                raise ConfigError(f"GGUF file is missing metadata key {arch}.{key}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"GGUF metadata {arch}.{key} must be a finite number, got {str(value)[:40]!r}")
            return value

        def optional(key: str) -> Any:
            return get(key) if metadata.get(f"{arch}.{key}") is not None else None

        n_heads = _positive_heads(int(get("attention.head_count")), f"GGUF metadata {arch}.attention.head_count")
        dim = int(get("embedding_length"))
        vocab = optional("vocab_size")
        if vocab is None:
            tokens = metadata.get("tokenizer.ggml.tokens")
            if tokens is None:
                raise ConfigError("GGUF file has neither {arch}.vocab_size nor a tokenizer vocabulary")
            vocab = len(tokens)
        if family == "gpt2":
            return cls(
                arch="gpt2",
                vocab_size=int(vocab),
                dim=dim,
                n_layers=int(get("block_count")),
                n_heads=n_heads,
                n_kv_heads=n_heads,
                ffn_dim=int(get("feed_forward_length")),
                max_seq_len=int(get("context_length")),
                norm_eps=float(get("attention.layer_norm_epsilon", 1e-5)),
                tie_embeddings="output.weight" not in tensor_names,
                act="gelu_new",
                name=str(metadata.get("general.name", "")),
            )
        if family == "bert":
            raise ConfigError("BERT models are loaded from Hugging Face folders, not GGUF files")
        n_layers = int(get("block_count"))
        head_dim = optional("attention.key_length")
        head_size = int(head_dim) if head_dim is not None else dim // n_heads
        rope_dim = optional("rope.dimension_count")
        common = dict(
            vocab_size=int(vocab), dim=dim, n_layers=n_layers, n_heads=n_heads,
            n_kv_heads=int(get("attention.head_count_kv", n_heads)), ffn_dim=int(get("feed_forward_length")),
            max_seq_len=int(get("context_length")), norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            head_dim=head_size if head_size != dim // n_heads else None, rope_theta=float(get("rope.freq_base", 10000.0)),
            tie_embeddings="output.weight" not in tensor_names, name=str(metadata.get("general.name", "")),
        )
        if family == "gemma3":
            return _gemma3_from_gguf(cls, metadata, get, optional, int(vocab))
        if family == "gemma2":
            window = optional("attention.sliding_window")
            return cls(
                arch="gemma2", **common, act="gelu_new",
                sliding_window=int(window) if window else None,
                # llama.cpp's Gemma 2: even layers slide (swa pattern 2); queries scaled by head_size ** -0.5,
                # except in the 27B (46 layers), by (dim / n_heads) ** -0.5: its query_pre_attn_scalar 144
                layer_types=_alternating(n_layers),
                query_pre_attn_scalar=float(dim // n_heads if n_layers == 46 else head_size),
                attn_softcap=_float_or_none(optional("attn_logit_softcapping")),
                final_softcap=_float_or_none(optional("final_logit_softcapping")),
            )
        scaling = None
        scaling_type = metadata.get(f"{arch}.rope.scaling.type")
        if arch == "phi3" and rope_factors is not None:
            original = int(get("rope.scaling.original_context_length"))
            scaling = _longrope({"short_factor": rope_factors[0], "long_factor": rope_factors[1],
                                 "original_max_position_embeddings": original,
                                 "attention_factor": optional("rope.scaling.attn_factor")},
                                {"max_position_embeddings": common["max_seq_len"]}, int(rope_dim or head_size))
        elif scaling_type == "linear":
            scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
        elif scaling_type not in (None, "none"):
            raise ConfigError(f"GGUF rope scaling {scaling_type!r} is not supported (linear is)")
        window = optional("attention.sliding_window") if arch == "phi3" else None  # 0: none (Phi-4)
        return cls(
            arch="llama", **common,
            rope_scaling=scaling,
            qkv_bias="blk.0.attn_q.bias" in tensor_names,
            sliding_window=int(window) if window else None,
            qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
            rope_dim=int(rope_dim) if rope_dim is not None and int(rope_dim) != head_size else None,
        )


def _positive_heads(n: Any, where: str) -> Any:
    """The head count, refused in one line before anything divides by it."""
    if isinstance(n, int) and not isinstance(n, bool) and n <= 0:
        raise ConfigError(f"{where} must be positive, got {n}")
    return n


def _hf_decoder_fields(cfg: dict[str, Any], tied: bool) -> dict[str, Any]:
    """The fields every RMSNorm decoder's config.json (Llama's, Gemma 2's, Gemma 3's) names alike;
    `tied`: the family's default for tie_word_embeddings."""
    n_heads = cfg["num_attention_heads"]
    return dict(
        vocab_size=cfg["vocab_size"], dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads, ffn_dim=cfg["intermediate_size"],
        norm_eps=cfg.get("rms_norm_eps", 1e-6), tie_embeddings=bool(cfg.get("tie_word_embeddings", tied)),
        name=cfg.get("_name_or_path", ""),
    )


def _alternating(n_layers: int) -> tuple[str, ...]:
    """Gemma 2's layer pattern (transformers' default and llama.cpp's): even layers slide, odd ones
    see every position. The count comes from a file: refused before a tuple of that size is built."""
    if type(n_layers) is not int or not 0 < n_layers <= 100_000:
        raise ConfigError(f"the layer count {str(n_layers)[:20]} is not one a model can have")
    return tuple("sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers))


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


def _hf_rope(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None, int | None]:
    """(theta, scaling or None, rotary dims or None for all) from a config.json, in either layout:
    top-level rope_theta / rope_scaling (transformers 4) or nested rope_parameters (transformers 5)."""
    scaling = cfg.get("rope_scaling") or None
    rope_theta = cfg.get("rope_theta")
    params = cfg.get("rope_parameters") or {}
    if rope_theta is None:
        rope_theta = params.get("rope_theta", 10000.0)
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = dict(params)
    partial = (scaling or {}).get("partial_rotary_factor") or params.get("partial_rotary_factor") \
        or cfg.get("partial_rotary_factor") or 1.0
    if scaling is not None:
        scaling = dict(scaling)
        scaling.setdefault("rope_type", scaling.get("type", "default"))
        if scaling["rope_type"] == "su":  # Phi-3's first name for LongRoPE
            scaling["rope_type"] = "longrope"
        for key in ("rope_theta", "partial_rotary_factor", "type"):
            scaling.pop(key, None)
        if scaling["rope_type"] == "default":
            scaling = None
    if scaling is not None and scaling["rope_type"] not in ("linear", "llama3", "longrope"):
        raise ConfigError(f"rope scaling {scaling['rope_type']!r} is not supported (linear, llama3 and longrope are)")
    if float(partial) == 1.0 and (scaling is None or scaling["rope_type"] != "longrope"):
        return float(rope_theta), scaling, None
    head_dim = cfg.get("head_dim") or int(cfg["hidden_size"]) // int(cfg["num_attention_heads"])
    rope_dim = int(head_dim * float(partial)) if float(partial) != 1.0 else None
    if scaling is not None and scaling["rope_type"] == "longrope":
        scaling = _longrope(scaling, cfg, rope_dim or head_dim)
    return float(rope_theta), scaling, rope_dim


def _longrope(scaling: dict[str, Any], cfg: dict[str, Any], rotary_dim: int) -> dict[str, Any]:
    """LongRoPE (Phi-3): per-frequency divisors for short and long contexts, the context the model was
    pretrained at, and the factor cos and sin are scaled by (transformers' formula when not given)."""
    original = scaling.get("original_max_position_embeddings") or cfg["original_max_position_embeddings"]
    short, long = [float(f) for f in scaling["short_factor"]], [float(f) for f in scaling["long_factor"]]
    if len(short) != rotary_dim // 2 or len(long) != rotary_dim // 2:
        raise ConfigError(f"LongRoPE factors must have {rotary_dim // 2} values each, got {len(short)} and {len(long)}")
    if not all(math.isfinite(f) and f > 0 for f in short + long):
        raise ConfigError("LongRoPE factors must be positive finite numbers")
    factor = scaling.get("factor") or cfg.get("max_position_embeddings", original) / original
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return {"rope_type": "longrope", "short_factor": short, "long_factor": long,
            "original_max_position_embeddings": int(original), "attention_factor": float(attention_factor)}


def _gelu_name(name: str) -> str:
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return "gelu_new"
    if name == "gelu":
        return "gelu"
    raise ConfigError(f"activation {name!r} is not supported; expected gelu or gelu_new")


# --- Gemma 3 ------------------------------------------------------------------------------------

def _gemma3_layer_types(n_layers: int, pattern: int) -> tuple[str, ...]:
    """Every `pattern`-th layer global, the others sliding (transformers' rule for configs that give
    `sliding_window_pattern` and no `layer_types`)."""
    return tuple("sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers))


def _gemma3_from_hf(cls: type[ModelConfig], cfg: dict[str, Any]) -> ModelConfig:
    for capped in ("final_logit_softcapping", "attn_logit_softcapping"):
        if cfg.get(capped) is not None:
            raise ConfigError(f"Gemma 3 with {capped} is not supported (Gemma 3 checkpoints set it to null)")
    if cfg.get("use_bidirectional_attention"):
        raise ConfigError("Gemma 3 with bidirectional attention (an embedding model) is not a causal language model")
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
        raise ConfigError(f"Gemma 3 hidden_activation {act!r} is not supported (gelu_pytorch_tanh is)")
    n_layers = cfg["num_hidden_layers"]
    layer_types = cfg.get("layer_types") or _gemma3_layer_types(n_layers, int(cfg.get("sliding_window_pattern", 6)))
    # transformers 5 writes rope_parameters per layer kind; older configs rope_theta, rope_local_base_freq
    # and rope_scaling (which applies to the global layers).
    params = cfg.get("rope_parameters") or {}
    full, local = dict(params.get("full_attention") or {}), dict(params.get("sliding_attention") or {})
    theta = float(full.pop("rope_theta", cfg.get("rope_theta", 1_000_000.0)))
    local_theta = float(local.pop("rope_theta", cfg.get("rope_local_base_freq", 10_000.0)))
    scaling = cfg.get("rope_scaling") or (full if full.get("rope_type", "default") != "default" else None)
    if scaling is not None:
        scaling = dict(scaling)
        scaling.setdefault("rope_type", scaling.get("type", "default"))
        scaling = None if scaling["rope_type"] == "default" else scaling
    if scaling is not None and scaling["rope_type"] not in ("linear", "llama3"):
        raise ConfigError(f"rope scaling {scaling['rope_type']!r} is not supported (linear and llama3 are)")
    if local.get("rope_type", "default") != "default":
        raise ConfigError(f"rope scaling {local['rope_type']!r} on sliding layers is not supported")
    return cls(
        arch="gemma3",
        **_hf_decoder_fields(cfg, tied=True),
        max_seq_len=cfg.get("max_position_embeddings", 131_072),
        head_dim=cfg.get("head_dim", 256),
        rope_theta=theta,
        rope_scaling=scaling,
        qkv_bias=bool(cfg.get("attention_bias", False)),
        act="gelu_new",
        sliding_window=cfg.get("sliding_window", 4096),
        query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar", 256)),
        layer_types=tuple(layer_types),
        rope_local_theta=local_theta,
    )


def _gemma3_from_gguf(cls: type[ModelConfig], metadata: dict[str, Any], get: Any, optional: Any, vocab: int) -> ModelConfig:
    """llama.cpp's gemma3 keys. The file does not store the layer pattern, the local RoPE base or
    query_pre_attn_scalar: llama.cpp and transformers' GGUF loader both take Gemma 3's (every 6th layer
    global, base 10,000, the head size, 256 for every Gemma 3 size up to 12B); the global base and any
    linear scaling are the file's."""
    n_heads = int(get("attention.head_count"))
    n_layers = int(get("block_count"))
    head_dim = int(get("attention.key_length", 256))
    scaling = None
    scaling_type = metadata.get("gemma3.rope.scaling.type")
    if scaling_type == "linear":
        scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    elif scaling_type not in (None, "none"):
        raise ConfigError(f"GGUF rope scaling {scaling_type!r} is not supported (linear is)")
    return cls(
        arch="gemma3",
        vocab_size=vocab,
        dim=int(get("embedding_length")),
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=int(get("attention.head_count_kv", n_heads)),
        ffn_dim=int(get("feed_forward_length")),
        max_seq_len=int(get("context_length")),
        norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        head_dim=head_dim,
        rope_theta=float(get("rope.freq_base", 1_000_000.0)),
        rope_scaling=scaling,
        tie_embeddings=True,
        act="gelu_new",
        sliding_window=int(get("attention.sliding_window", 4096)),
        name=str(metadata.get("general.name", "")),
        # llama.cpp's rule: 27B (62 layers) scales by dim / n_heads, the other sizes by the head size.
        query_pre_attn_scalar=float(int(get("embedding_length")) // n_heads if n_layers == 62 else head_dim),
        layer_types=_gemma3_layer_types(n_layers, 6),
        rope_local_theta=10_000.0,
    )
