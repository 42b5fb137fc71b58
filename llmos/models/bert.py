"""The BERT family as a text encoder: BERT, MiniLM, and sentence-transformers models built on them.

Learned absolute positions plus token-type embeddings, post-norm blocks (LayerNorm after each
residual add), bidirectional multi-head attention over the non-padding tokens, GELU (erf) MLP.
q/k/v are fused into `wqkv`, as in the other model files; the loader fuses them (weights/load.py).
There is no pooler and no language-modelling head: sentence embeddings pool the hidden states
outside the model (tasks/embed.py).

Contract: `forward(tokens (B, T), attention_mask (B, T), token_type_ids=None) -> hidden (B, T, C)`
in the weights' dtype. `attention_mask` is 1 (or True) for real tokens and 0 for padding; padding
positions never influence real ones, so a text's hidden states do not depend on how it is batched.
Padding positions come out as zeros.

Only the real tokens are computed: the batch is packed into one (N, C) matrix of its N real tokens
(no padding rows in the matmuls, norms and MLP, which are nearly all the work), and attention runs
per text over its own tokens, never over padding (`Packing`). `forward_packed` takes that packing
directly (tasks/embed.py pools from it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llmos.config import ModelConfig


@dataclass(frozen=True)
class Packing:
    """Where the N real tokens of a padded (B, T) batch sit once packed: `index` (N,) into the
    flattened B*T positions, text b at packed rows offsets[b] .. offsets[b+1]-1. Attention runs per
    text: PyTorch's SDPA over each run of equal-length texts, unmasked, so no query ever looks at
    padding (length-sorted batches have few distinct lengths, so few calls)."""

    batch: int
    length: int
    index: torch.Tensor
    lengths: tuple[int, ...]
    offsets: torch.Tensor

    @classmethod
    def of(cls, attention_mask: torch.Tensor) -> Packing:
        B, T = attention_mask.shape
        real = attention_mask.bool()
        lengths = real.sum(dim=1)
        if bool((lengths == 0).any()):
            raise ValueError("every row of attention_mask needs at least one real token")
        offsets = torch.zeros(B + 1, dtype=torch.long)
        offsets[1:] = lengths.cumsum(0)
        return cls(B, T, real.reshape(-1).nonzero().squeeze(1), tuple(lengths.tolist()), offsets)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(N, F) packed rows -> (B, T, F), zeros at padding."""
        out = x.new_zeros(self.batch * self.length, x.shape[-1])
        out[self.index] = x
        return out.view(self.batch, self.length, x.shape[-1])  # (B, T, F)

    def attend(self, qkv: torch.Tensor, n_heads: int) -> torch.Tensor:
        """Each token's attention over its own text's tokens: qkv (N, 3*H*D) -> (N, H*D)."""
        H, D = n_heads, qkv.shape[1] // (3 * n_heads)
        out, start, b = [], 0, 0
        while b < self.batch:
            L, e = self.lengths[b], b + 1
            while e < self.batch and self.lengths[e] == L:
                e += 1
            G = e - b
            x = qkv[start:start + G * L].view(G, L, 3, H, D).permute(2, 0, 3, 1, 4)  # (3, G, H, L, D)
            y = F.scaled_dot_product_attention(x[0], x[1], x[2])  # (G, H, L, D)
            out.append(y.transpose(1, 2).reshape(G * L, H * D))  # (G*L, H*D)
            start, b = start + G * L, e
        return out[0] if len(out) == 1 else torch.cat(out)


class Embeddings(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.pos_embed = nn.Embedding(config.max_seq_len, config.dim)
        self.type_embed = nn.Embedding(max(config.type_vocab_size, 1), config.dim)
        self.norm = nn.LayerNorm(config.dim, eps=config.norm_eps)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        """All (N,) packed: token ids, their positions in their own text, their segment ids."""
        return self.norm(self.embed(tokens) + self.pos_embed(positions) + self.type_embed(token_type_ids))


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.hd = config.n_heads, config.head_size
        self.wqkv = nn.Linear(config.dim, 3 * self.n_heads * self.hd)
        self.wo = nn.Linear(self.n_heads * self.hd, config.dim)

    def forward(self, x: torch.Tensor, packing: Packing) -> torch.Tensor:
        return self.wo(packing.attend(self.wqkv(x), self.n_heads))  # (N, C)


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

    def forward(self, x: torch.Tensor, packing: Packing) -> torch.Tensor:
        x = self.attn_norm(x + self.attn(x, packing))
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
        packing = Packing.of(attention_mask)
        return packing.pad(self.forward_packed(tokens, packing, token_type_ids))  # (B, T, C)

    def forward_packed(self, tokens: torch.Tensor, packing: Packing,
                       token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states (N, C) of the real tokens of a padded (B, T) batch of `tokens`, in `packing.index` order."""
        B, T = tokens.shape
        if T > self.config.max_seq_len:
            raise ValueError(f"{T} tokens exceed this model's {self.config.max_seq_len} positions; truncate first")
        positions = torch.arange(T, device=tokens.device).repeat(B)  # (B*T,): each text counts from 0
        if token_type_ids is None:
            types = torch.zeros(len(packing.index), dtype=torch.long, device=tokens.device)
        else:
            types = token_type_ids.reshape(-1)[packing.index]
        x = self.embeddings(tokens.reshape(-1)[packing.index], positions[packing.index], types)  # (N, C)
        for layer in self.layers:
            x = layer(x, packing)
        return x  # (N, C)
