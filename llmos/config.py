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
    "gpt2": "gpt2",
    "bert": "bert",
    "gemma3_text": "gemma3",
}
# GGUF `general.architecture` -> llmos architecture family.
_GGUF_FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "gpt2": "gpt2", "bert": "bert", "gemma3": "gemma3"}


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # "llama" | "gpt2" | "bert" | "gemma3": which model file runs it
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
    name: str = ""  # human-readable model name, informational only
    # Gemma 3: attention scores scaled by query_pre_attn_scalar ** -0.5 (not head_size ** -0.5); which
    # layers attend within `sliding_window` ("sliding_attention") or to everything ("full_attention");
    # the RoPE base of the sliding layers (`rope_theta` and `rope_scaling` are the full layers').
    query_pre_attn_scalar: float | None = None
    layer_types: tuple[str, ...] | None = None
    rope_local_theta: float | None = None

    @property
    def head_size(self) -> int:
        return self.head_dim if self.head_dim is not None else self.dim // self.n_heads

    @property
    def n_rep(self) -> int:
        """Query heads sharing one key/value head (grouped-query attention)."""
        return self.n_heads // self.n_kv_heads

    def __post_init__(self) -> None:
        for f in fields(self):  # values come from files: types are checked, not trusted
            value = getattr(self, f.name)
            if f.type in ("int", "int | None") and value is not None and (type(value) is not int):
                raise ConfigError(f"model config field {f.name} must be an integer, got {value!r}")
            if f.type == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value)):
                raise ConfigError(f"model config field {f.name} must be a finite number, got {value!r}")
        if self.arch not in ("llama", "gpt2", "bert", "gemma3"):
            raise ConfigError(f"unknown architecture {self.arch!r}: llmos runs llama, gpt2, bert and gemma3 families")
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"model config field {name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim is None and self.dim % self.n_heads:
            raise ConfigError(f"dim ({self.dim}) must be a multiple of n_heads ({self.n_heads})")
        if self.head_dim is not None and self.head_dim <= 0:
            raise ConfigError(f"model config field head_dim must be positive, got {self.head_dim}")
        if self.layer_types is not None and (len(self.layer_types) != self.n_layers or not set(self.layer_types)
                                             <= {"sliding_attention", "full_attention"}):
            raise ConfigError(f"layer_types must name sliding_attention or full_attention for each of the "
                              f"{self.n_layers} layers, got {list(self.layer_types)[:8]}")
        if self.head_size % 2 and self.arch in ("llama", "gemma3"):
            raise ConfigError(f"the head size ({self.head_size}) must be even for rotary positions")

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
        n_heads = cfg["num_attention_heads"]
        scaling = cfg.get("rope_scaling") or None
        rope_theta = cfg.get("rope_theta")
        # transformers 5 nests rope settings under "rope_parameters".
        params = cfg.get("rope_parameters") or {}
        if rope_theta is None:
            rope_theta = params.get("rope_theta", 10000.0)
        if scaling is None and params.get("rope_type", "default") != "default":
            scaling = dict(params)
        if scaling is not None:
            scaling = dict(scaling)
            scaling.setdefault("rope_type", scaling.get("type", "default"))
            scaling.pop("rope_theta", None)
            if scaling["rope_type"] == "default":
                scaling = None
        if scaling is not None and scaling["rope_type"] not in ("linear", "llama3"):
            raise ConfigError(f"rope scaling {scaling['rope_type']!r} is not supported (linear and llama3 are)")
        hidden_act = cfg.get("hidden_act", "silu")
        if hidden_act != "silu":
            raise ConfigError(f"hidden_act {hidden_act!r} is not supported for {model_type}; expected 'silu'")
        return cls(
            arch="llama",
            vocab_size=cfg["vocab_size"],
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            ffn_dim=cfg["intermediate_size"],
            max_seq_len=cfg.get("max_position_embeddings", 2048),
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            head_dim=cfg.get("head_dim"),
            rope_theta=float(rope_theta),
            rope_scaling=scaling,
            qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            sliding_window=cfg.get("sliding_window") if model_type == "mistral" else None,
            name=cfg.get("_name_or_path", ""),
        )

    @classmethod
    def from_gguf(cls, metadata: dict[str, Any], tensor_names: set[str] | frozenset[str]) -> ModelConfig:
        """Build from GGUF metadata; `tensor_names` tells whether the output head is tied."""
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

        n_heads = int(get("attention.head_count"))
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
        if family == "gemma3":
            return _gemma3_from_gguf(cls, metadata, get, optional, int(vocab))
        scaling = None
        scaling_type = metadata.get(f"{arch}.rope.scaling.type")
        if scaling_type == "linear":
            scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
        elif scaling_type not in (None, "none"):
            raise ConfigError(f"GGUF rope scaling {scaling_type!r} is not supported (linear is)")
        head_dim = optional("attention.key_length")
        return cls(
            arch="llama",
            vocab_size=int(vocab),
            dim=dim,
            n_layers=int(get("block_count")),
            n_heads=n_heads,
            n_kv_heads=int(get("attention.head_count_kv", n_heads)),
            ffn_dim=int(get("feed_forward_length")),
            max_seq_len=int(get("context_length")),
            norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            head_dim=int(head_dim) if head_dim is not None and int(head_dim) != dim // n_heads else None,
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            qkv_bias="blk.0.attn_q.bias" in tensor_names,
            tie_embeddings="output.weight" not in tensor_names,
            sliding_window=None,
            name=str(metadata.get("general.name", "")),
        )


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
    n_heads = cfg["num_attention_heads"]
    return cls(
        arch="gemma3",
        vocab_size=cfg["vocab_size"],
        dim=cfg["hidden_size"],
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        ffn_dim=cfg["intermediate_size"],
        max_seq_len=cfg.get("max_position_embeddings", 131_072),
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        head_dim=cfg.get("head_dim", 256),
        rope_theta=theta,
        rope_scaling=scaling,
        qkv_bias=bool(cfg.get("attention_bias", False)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        act="gelu_new",
        sliding_window=cfg.get("sliding_window", 4096),
        name=cfg.get("_name_or_path", ""),
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
