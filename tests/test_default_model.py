"""The real default model (SmolLM2-135M-Instruct, GGUF Q4_1) against transformers on the same file.

transformers dequantizes the GGUF to fp32; llmos must give the same logits (< 1e-3) on several
prompts and the same greedy continuation; the README's transformers-style example must run.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llmos
from llmos.engine.generate import Generation
from llmos.engine.sampling import SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "北京是中国的首都，",
    "Once upon a time, in a land far away, there lived a 🐉 who",
    "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def reference(default_gguf_path):
    transformers = pytest.importorskip("transformers")
    path = Path(default_gguf_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval()


def test_logits_match_transformers(llm, reference):
    for prompt in PROMPTS:
        ids = llm.encode(prompt)
        got = llm.logits(ids)
        with torch.no_grad():
            expected = reference(torch.tensor([ids])).logits[0]
        assert got.shape == expected.shape == (len(ids), 49152)
        assert (got - expected).abs().max().item() < 1e-3, prompt


def test_greedy_64_tokens_match_transformers(llm, reference):
    text = llm.tokenizer.apply_chat_template([{"role": "user", "content": "Write a short poem about the sea."}])
    ids = llm.encode(text, add_special_tokens=False)
    with torch.no_grad():
        expected = reference.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False, min_new_tokens=64,
                                      pad_token_id=2)[0, len(ids):].tolist()
    gen = Generation(llm.model, ids, max_new_tokens=64, params=SamplingParams(temperature=0.0), min_new_tokens=64)
    assert list(gen.tokens()) == expected


def test_chat_answers_capital_of_france(llm):
    reply = llm.chat([{"role": "user", "content": "What is the capital of France?"}], temperature=0)
    assert "Paris" in reply
    assert reply.finish_reason == "eos"
    assert reply.completion_tokens > 0 and reply.prompt_tokens > 10


def test_generate_reports_length_and_seed_reproduces(llm):
    a = llm.generate("LLMOS is a", max_new_tokens=12, seed=7)
    b = llm.generate("LLMOS is a", max_new_tokens=12, seed=7)
    assert a == b and a.finish_reason == "length" and a.completion_tokens == 12


def test_stream_concatenates_to_generate(llm):
    full = llm.generate("The three primary colors are", max_new_tokens=24, temperature=0)
    assert "".join(llm.stream("The three primary colors are", max_new_tokens=24, temperature=0)) == full


def test_transformers_style_example_runs(default_model_name, capsys):
    from llmos import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_name)
    model = AutoModelForCausalLM.from_pretrained(default_model_name)
    input_ids = tokenizer.encode("LLMOS is a", return_tensors="pt")
    output = model.generate(input_ids, max_length=50, num_return_sequences=1)
    print(tokenizer.decode(output[0], skip_special_tokens=True))
    printed = capsys.readouterr().out
    assert printed.startswith("LLMOS is a") and len(printed.split()) > 5
    assert output.shape[0] == 1 and output.shape[1] <= 50


def test_cli_generate_streams_text(default_gguf_path):
    out = subprocess.run(
        [sys.executable, "-m", "llmos", "generate", "The capital of France is", "--model", str(default_gguf_path),
         "--max-new-tokens", "8", "--temperature", "0"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("The capital of France is") and len(out.stdout) > len("The capital of France is") + 5


def test_cli_bad_model_is_one_line_error():
    out = subprocess.run([sys.executable, "-m", "llmos", "generate", "hi", "--model", "no-such-model"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr.startswith("llmos: error:") and "no-such-model" in out.stderr
    assert "Traceback" not in out.stderr
