"""Gemma 3 in the fast weight forms: the tied 262k-row table is most of the model, so the quantized
forms keep it once, in int8, serving both the head and the embeddings (quant.HeadEmbedding), and a
converted copy in the store round-trips it. Tiny random config, through the production loader."""

from __future__ import annotations

import torch
import transformers

from llmos import quant
from llmos.weights import converted
from llmos.weights.load import load_hf, read_hf_config


def _folder(tmp_path):
    torch.manual_seed(0)
    config = transformers.Gemma3TextConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                           max_position_embeddings=128, sliding_window=8, sliding_window_pattern=2)
    transformers.Gemma3ForCausalLM(config).save_pretrained(tmp_path / "g")
    return tmp_path / "g"


def test_int8_form_reads_embeddings_from_the_head_and_round_trips(tmp_path):
    folder = _folder(tmp_path)
    config = read_hf_config(folder)
    ref = load_hf(folder, config)
    model = load_hf(folder, config, linear_hook=quant.linear_hook("int8"))
    assert isinstance(model.embed, quant.HeadEmbedding) and isinstance(model.output, quant.Int8Head)
    assert not any(p.dtype == torch.float32 and p.numel() >= 512 * 64 for p in model.parameters())  # no fp32 table
    tokens = torch.randint(0, 512, (1, 20))
    with torch.no_grad():
        want, got = ref(tokens, torch.arange(20)), model(tokens, torch.arange(20))
    assert (got - want).abs().max().item() < 0.05 * want.abs().max().item()
    # embeddings are the head's int8 rows times their scale
    emb = model.embed(tokens[0])
    assert (emb - ref.embed(tokens[0])).abs().max().item() < 0.01 * ref.embed.weight.abs().max().item()
    path = tmp_path / "c.safetensors"
    converted.save(model, path)
    again = converted.load(path, config)
    assert isinstance(again.embed, quant.HeadEmbedding)
    with torch.no_grad():
        assert torch.equal(again(tokens, torch.arange(20)), got)


def test_int8_head_native_kernel_matches_aten(tmp_path):
    """The head's rows through the native int8 kernel (when built) and through ATen's agree; the
    embedding rows are the table's rows."""
    from llmos.engine import native

    torch.manual_seed(3)
    w = torch.randn(256, 64)
    head = quant.Int8Linear(w, None).tied()
    assert torch.equal(head.qweight(), quant.Int8Linear(w, None).qweight)
    ids = torch.tensor([0, 63, 64, 255])
    assert torch.equal(head.rows(ids), quant.Int8Linear(w, None).qweight[ids])
    x = torch.randn(1, 64)
    aten = head(x)  # PyTorch's kernels until installed
    head.kernels = native.kernels()
    if head.kernels.name == "native":
        assert (head(x) - aten).abs().max().item() < 2e-2 * aten.abs().max().item()  # ATen rounds to bf16
