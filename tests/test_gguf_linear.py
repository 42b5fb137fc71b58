"""GGUFLinear (the file's own form): a tiny random Llama written to GGUF with its linear weights in
each GGML type gives the logits of the fp32 model of the same file's dequantized weights (the
production loader's fp32 form) within 1e-4, on the row kernels; the dense (bf16) prefill path within
bf16 rounding; and the embeddings read from the head's blocks equal the dequantized table."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from llmos.gguf_linear import DENSE_ROWS, GGUFEmbedding, GGUFLinear
from llmos.models import set_module
from llmos.weights.gguf import GGUFFile
from llmos.weights.load import load_gguf, open_gguf_config, unpermute_gguf_qk
from tests.engine.gguf_blocks import NAMES, random_blocks
from tests.weights.tiny_checkpoints import write_gguf

SHAPE = {"n_layers": 2, "dim": 256, "heads": 4, "kv": 2, "ffn": 512}
# Gemma 3's Q4_K_M file mixes types per tensor; this mix puts them in one fused layer too.
MIXED = {"attn_q": 6, "attn_k": 6, "attn_v": 8, "attn_output": 12, "ffn_gate": 6, "ffn_up": 13, "ffn_down": 14,
         "token_embd": 8}


def write(path: Path, types: dict[str, int]) -> Path:
    """The tiny Llama as GGUF, every 2-D tensor stored in types[short name] (Q4_0 .. Q6_K)."""
    rng = np.random.default_rng(1)

    def encode(name: str, arr: np.ndarray) -> tuple[np.ndarray, int | None]:
        if arr.ndim != 2:
            return arr, None
        qtype = types[name.split(".")[-2] if name.startswith("blk.") else name.split(".")[0]]
        try:
            return gguf.quants.quantize(arr, gguf.GGMLQuantizationType(qtype)), qtype
        except (NotImplementedError, gguf.quants.QuantError):  # gguf 0.19 has no K-quant quantizer
            return random_blocks(qtype, *arr.shape, rng, "small"), qtype

    return write_gguf(path, shape=SHAPE, encode=encode)


def part(f: GGUFFile, name: str, heads: int | None = None) -> tuple[torch.Tensor, int]:
    """A tensor's blocks as (rows, row_bytes) uint8 over the map; q/k rows un-permuted as the loader does."""
    info = f.tensors[name]
    raw = torch.from_numpy(f.raw(name)).view(info.shape[0], -1)
    return (raw if heads is None else unpermute_gguf_qk(raw, heads).contiguous()), info.qtype


def file_form(f: GGUFFile):
    """The fp32 model of the file with every Linear swapped for a GGUFLinear over the file's blocks:
    what the loader should do for `--dtype auto` on a quantized GGUF (see gguf_linear.py)."""
    config = open_gguf_config(f)
    model = load_gguf(f, config)
    for i in range(config.n_layers):
        b = f"blk.{i}"
        set_module(model, f"layers.{i}.attn.wqkv", GGUFLinear([part(f, f"{b}.attn_q.weight", config.n_heads),
                                                              part(f, f"{b}.attn_k.weight", config.n_kv_heads),
                                                              part(f, f"{b}.attn_v.weight")]))
        set_module(model, f"layers.{i}.attn.wo", GGUFLinear([part(f, f"{b}.attn_output.weight")]))
        set_module(model, f"layers.{i}.mlp.w13", GGUFLinear([part(f, f"{b}.ffn_gate.weight"), part(f, f"{b}.ffn_up.weight")]))
        set_module(model, f"layers.{i}.mlp.w2", GGUFLinear([part(f, f"{b}.ffn_down.weight")]))
    head = GGUFLinear([part(f, "token_embd.weight")])  # tied: the head serves the embeddings too
    model.output = head
    model.embed = head.embedding()
    return model


CASES = {NAMES[t]: {k: t for k in MIXED} for t in sorted(NAMES)} | {"Q4_K_M-like mix": MIXED}


@pytest.fixture(scope="module", params=list(CASES))
def models(request, tmp_path_factory):
    path = write(tmp_path_factory.mktemp("gguf") / "tiny.gguf", CASES[request.param])
    f = GGUFFile(path)
    reference = load_gguf(f, open_gguf_config(f))  # the production loader, fp32 dequantized weights
    return reference, file_form(f)


@torch.inference_mode()
def test_logits_equal_the_dequantized_fp32_model(models):
    reference, native = models
    tokens = torch.tensor([[1, 17, 200, 33, 90, 5, 250]])  # 7 rows: the row kernels
    assert tokens.shape[1] < DENSE_ROWS
    want = reference(tokens, torch.arange(7))
    got = native(tokens, torch.arange(7))
    assert (got - want).abs().max().item() < 1e-4 * max(1.0, want.abs().max().item())
    assert torch.equal(native.embed(tokens), reference.embed(tokens))


@torch.inference_mode()
def test_a_row_in_a_batch_equals_it_alone(models):
    _, native = models
    tokens = torch.tensor([[3, 40, 41], [3, 40, 99]])
    both = native(tokens, torch.arange(3))
    assert torch.equal(both[1:], native(tokens[1:], torch.arange(3)))


@torch.inference_mode()
def test_prefill_runs_the_dense_bf16_path(models):
    reference, native = models
    tokens = torch.arange(3, 3 + 2 * DENSE_ROWS)[None]
    want = reference(tokens, torch.arange(tokens.shape[1]))
    got = native(tokens, torch.arange(tokens.shape[1]))
    assert (got - want).abs().max().item() < 3e-2 * max(1.0, want.abs().max().item())  # bf16 weights and activations


def test_state_dict_holds_the_blocks_once(models):
    _, native = models
    assert isinstance(native.embed, GGUFEmbedding)
    floats = sum(t.numel() for n, t in native.state_dict().items() if t.dtype == torch.float32 and t.dim() == 2)
    assert floats == 0  # no fp32 copy of any matrix
