"""Fixtures for the summarization, translation and text-evaluation tests.

`tiny_model_dir`: a random Llama Hugging Face folder (hidden 32, 2 layers, 256-token context) with the
default model's tokenizer and chat template, loadable by `llmos.load`: map-reduce runs over documents
many times its context in seconds. Its text is noise; tests check structure, counts and budgets.
"""

from __future__ import annotations

import json

import pytest
import torch

CONTEXT = 256


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, default_model_name):
    import transformers

    from llmos.api import load_tokenizer

    tok = load_tokenizer(default_model_name)
    folder = tmp_path_factory.mktemp("tiny-chat-llama")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=CONTEXT, tie_word_embeddings=True,
        bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, initializer_range=0.2)  # varied greedy text
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tok.backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": tok.chat_template, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>", "add_bos_token": False}))
    return folder


@pytest.fixture(scope="session")
def tiny_llm(tiny_model_dir):
    import llmos

    return llmos.load(tiny_model_dir, dtype="fp32")


@pytest.fixture(autouse=True)
def _one_thread():
    """The test machine is shared: the tiny model gains nothing from intra-op threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
