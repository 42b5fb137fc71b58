"""LoRA on the real default model (SmolLM2-135M-Instruct, dequantized from Q4_1): the loss goes down.

Built from the same pieces `llmos finetune --lora` uses, minus writing the 0.5 GB merged folder at
the end: a handful of steps on a small domain text, validation loss measured on the same held-out
windows before and after.
"""

from __future__ import annotations

import pytest
import torch

from llmos.models.lora import LoraConfig, apply_lora
from llmos.tokenizer import Tokenizer
from llmos.train.data import Windows, prepare_data
from llmos.train.distributed import World
from llmos.train.loop import TrainConfig, evaluate, train
from llmos.train.run import load_for_training
from llmos.weights.gguf import GGUFFile


@pytest.mark.slow
def test_lora_on_the_default_model_lowers_the_loss(default_gguf_path, domain_files, tmp_path):
    model, config = load_for_training(default_gguf_path)
    with GGUFFile(default_gguf_path) as gguf:
        tokenizer = Tokenizer.from_gguf(gguf.metadata)
    torch.manual_seed(0)
    names = apply_lora(model, LoraConfig(rank=8, alpha=16, targets=("q_proj", "v_proj", "o_proj")))
    assert len(names) == 2 * config.n_layers  # wqkv and wo in each of the 30 layers
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable < 0.02 * sum(p.numel() for p in model.parameters())

    cfg = TrainConfig(steps=6, batch_size=4, seq_len=32, lr=2e-3, warmup=1, eval_every=6, save_every=6,
                      eval_batches=1, log_every=1)
    shards = prepare_data([domain_files[0]], tokenizer, tmp_path / "data", seed=0, min_tokens=cfg.seq_len + 1)
    train_w = Windows(shards.tokens("train"), None, cfg.seq_len, cfg.seed)
    val_w = Windows(shards.tokens("val"), None, cfg.seq_len, cfg.seed)
    world = World(0, 1, 0, torch.device("cpu"))
    before, _ = evaluate(model, val_w, cfg, world)
    metrics = train(model, train_w, val_w, cfg, tmp_path / "run", world, progress=False)
    after = metrics["val_loss"]
    assert after < before - 0.3, (before, after)


@pytest.mark.slow
def test_default_model_exports_to_hf_and_gguf(default_gguf_path, tmp_path):
    """The real model and its real tokenizer (smollm pre-tokenizer, ChatML, no BOS) survive export."""
    import transformers

    import llmos
    from llmos.weights.export import save_gguf, save_hf

    model, config = load_for_training(default_gguf_path)
    with GGUFFile(default_gguf_path) as gguf:
        tokenizer = Tokenizer.from_gguf(gguf.metadata)
    chat = [{"role": "user", "content": "What is the capital of France? Answer in 3 words."}]
    ids = tokenizer.encode(tokenizer.apply_chat_template(chat), add_special_tokens=False)
    with torch.no_grad():
        expected = model(torch.tensor([ids]), torch.arange(len(ids)))[0]

    folder = save_hf(model, config, tokenizer, tmp_path / "hf")
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (ref(torch.tensor([ids])).logits[0] - expected).abs().max().item() < 1e-3
    del ref
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert hf_tok.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)["input_ids"] == ids

    path = save_gguf(model, config, tokenizer, tmp_path / "m.gguf", "f16")
    del model
    back = llmos.load(str(path), dtype="fp32")
    assert back.tokenizer.encode("Paris, 2024: naïve café!") == tokenizer.encode("Paris, 2024: naïve café!")
    assert back.tokenizer.chat_template == tokenizer.chat_template
    assert back.tokenizer.bos_id == tokenizer.bos_id and back.tokenizer.eos_id == tokenizer.eos_id
    got = back.logits(ids)
    assert (got - expected).abs().max().item() < 0.02 * expected.abs().max().item()
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean().item() > 0.95
