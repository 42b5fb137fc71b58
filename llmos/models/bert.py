"""The BERT family as a text encoder: BERT, MiniLM, and sentence-transformers models built on them.

Learned absolute positions plus token-type embeddings, post-norm blocks (LayerNorm after each
residual add), bidirectional multi-head attention over the non-padding tokens, GELU (erf) MLP.
q/k/v are fused into `wqkv`, as in the other model files; the loader fuses them (weights/load.py).
There is no pooler and no language-modelling head: sentence embeddings pool the hidden states
outside the model (tasks/embed.py).

Contract: `forward(tokens (B, T), attention_mask (B, T), token_type_ids=None) -> hidden (B, T, C)`
in the weights' dtype. `attention_mask` is 1 (or True) for real tokens and 0 for padding; padding
positions never influence real ones, so a text's hidden states do not depend on how it is batched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmos.config import ModelConfig


class Embeddings(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.pos_embed = nn.Embedding(config.max_seq_len, config.dim)
        self.type_embed = nn.Embedding(max(config.type_vocab_size, 1), config.dim)
        self.norm = nn.LayerNorm(config.dim, eps=config.norm_eps)

    def forward(self, tokens: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed(tokens) + self.pos_embed(positions)[None] + self.type_embed(token_type_ids)
        return self.norm(x)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.hd = config.n_heads, config.head_size
        self.wqkv = nn.Linear(config.dim, 3 * self.n_heads * self.hd)
        self.wo = nn.Linear(self.n_heads * self.hd, config.dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.wqkv(x).split(self.n_heads * self.hd, dim=-1)
        q = q.view(B, T, self.n_heads, self.hd).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_heads, self.hd).transpose(1, 2)  # (B, H, T, D)
        v = v.view(B, T, self.n_heads, self.hd).transpose(1, 2)  # (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd)  # (B, T, H*D)
        return self.wo(y)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.dim, config.ffn_dim)
        self.proj = nn.Linear(config.ffn_dim, config.dim)
        self.approximate = "tanh" if config.act == "gelu_new" else "none"  # BERT's own is erf ("gelu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate=self.approximate))


class Block(nn.Module):
    """Post-norm: x = norm(x + attn(x)); x = norm(x + mlp(x)), as the original BERT."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attn = Attention(config)
        self.attn_norm = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.mlp = MLP(config)
        self.mlp_norm = nn.LayerNorm(config.dim, eps=config.norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.attn_norm(x + self.attn(x, mask))
        return self.mlp_norm(x + self.mlp(x))


class Bert(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))

    def tie_weights(self) -> None:
        """An encoder has no output head to tie; here for the shared loader."""

    def forward(
        self,
        tokens: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        T = tokens.shape[1]
        if T > self.config.max_seq_len:
            raise ValueError(f"{T} tokens exceed this model's {self.config.max_seq_len} positions; truncate first")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(tokens)
        # Every query may see every real key; padding keys are hidden. (B, 1, 1, T) broadcasts over heads.
        # Without padding there is nothing to hide, and no mask lets SDPA pick its fused kernel.
        mask = None if bool(attention_mask.all()) else attention_mask.bool()[:, None, None, :]
        x = self.embeddings(tokens, token_type_ids)
        for layer in self.layers:
            x = layer(x, mask)
        return x  # (B, T, C)
