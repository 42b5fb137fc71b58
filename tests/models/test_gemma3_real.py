"""The real Gemma 3 270M file (GGUF Q4_K_M, the store's gemma3-270m) against transformers on the same file.

transformers dequantizes the GGUF to fp32 (`from_pretrained(folder, gguf_file=..., dtype=float32)`,
20-130 s); llmos in fp32 must give the same logits (< 1e-3) on five prompts, one longer than the
512-token sliding window, the same 64 greedy tokens, and its tokenizer the same ids as transformers'
on text in many scripts and odd whitespace.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

import llmos
from llmos.engine.generate import Generation
from llmos.engine.sampling import SamplingParams
from llmos.tokenizer import Tokenizer
from llmos.weights import loader
from llmos.weights.gguf import GGUFFile

LONG = " ".join(["The history of the railway begins with wagonways in the sixteenth century, and steam "
                 "locomotives changed travel across Europe and the world."] * 30)  # ~750 tokens
PROMPTS = [
    "The capital of France is",
    "English: Where is the train station?\nFrench:",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "北京是中国的首都，東京は日本の首都です。 مرحبا 🐉",
    LONG,
]
TEXTS = [
    "Where is the train station? I'd like two tickets, please.",
    "Où est la gare ? Je voudrais un café, s'il vous plaît.",
    "Größenwahnsinnige Straßenbahnfahrer übernehmen Verantwortung.",
    "我喜欢学习中文。北京是中国的首都。",
    "東京は日本の首都です。ひらがなとカタカナ。",
    "مرحبا بالعالم، كيف حالك؟",
    "Привет, как дела? नमस्ते दुनिया",
    "def f(x):\n    return x ** 2  # square\n\nprint(f(3))\n",
    "😀👍🏽🇫🇷 emoji 🧑‍💻 🤖🤖🤖",
    "   \n \t \u00a0 \u3000 odd   whitespace \r\n\n\n\n  end  ",
    "<start_of_turn>user\nhi<end_of_turn> <0x0A> literal",
    "https://example.com/path?q=1&b=2 1234567890 3.14159",
    "",
]


@pytest.fixture(scope="module")
def gemma(gemma3_path):
    return llmos.load(gemma3_path, dtype="fp32", quiet=True)


@pytest.fixture(scope="module")
def reference(gemma3_path):
    transformers = pytest.importorskip("transformers")
    path = Path(gemma3_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model.eval(), tokenizer


def test_token_ids_match_transformers(gemma, reference, gemma3_path, tmp_path, monkeypatch):
    """The loaded model's tokenizer, and the tokenizers backend of one read into an empty store (merges
    derived, then cached) and read again (merges from the cache), all give transformers' ids."""
    _, ref_tok = reference
    monkeypatch.setenv("LLMOS_HOME", str(tmp_path))
    cold = loader.read_tokenizer(gemma3_path).backend
    assert list((tmp_path / "tokenizers").glob("*-merges.bin"))
    warm = loader.read_tokenizer(gemma3_path).backend
    for text in TEXTS + PROMPTS:
        expected = ref_tok.encode(text)
        assert gemma.encode(text) == cold.encode(text).ids == warm.encode(text).ids == expected, text[:40]
    assert (gemma.tokenizer.bos_id, gemma.tokenizer.eos_id) == (ref_tok.bos_token_id, ref_tok.eos_token_id) == (2, 1)


def test_logits_match_transformers(gemma, reference):
    model, _ = reference
    assert len(gemma.encode(LONG)) > 512  # past the sliding window: local and global layers differ
    for prompt in PROMPTS:
        ids = gemma.encode(prompt)
        got = gemma.logits(ids)
        with torch.no_grad():
            expected = model(torch.tensor([ids])).logits[0]
        assert got.shape == expected.shape == (len(ids), 262144)
        assert (got - expected).abs().max().item() < 1e-3, prompt[:40]


def test_greedy_64_tokens_match_transformers(gemma, reference):
    model, _ = reference
    ids = gemma.encode("English: Where is the train station?\nFrench:")
    with torch.no_grad():
        expected = model.generate(torch.tensor([ids]), max_new_tokens=64, min_new_tokens=64, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    got = list(Generation(gemma.model, ids, max_new_tokens=64, params=SamplingParams(temperature=0.0)).tokens())
    assert got == expected


def test_tokenizer_builds_from_the_file(gemma3_path, tmp_path):
    """262,144 pieces; the build times are printed (the issue asks < 1 s; see the README for the
    measure), and those of the tokenizers backend, merges derived and from the cache."""
    with GGUFFile(gemma3_path) as f:
        metadata = f.metadata
    for run in ("derived", "cached"):
        start = time.perf_counter()
        tok = Tokenizer.from_gguf(metadata, merges_cache=tmp_path / "merges.bin")
        built = time.perf_counter()
        assert tok.vocab_size == 262144
        assert tok.decode(tok.encode("Où est la gare ?"), skip_special_tokens=True) == "Où est la gare ?"
        encoded = time.perf_counter()
        assert tok.backend.get_vocab_size() == 262144
        print(f"gemma3 tokenizer built in {built - start:.2f} s, first encode {encoded - built:.3f} s, "
              f"tokenizers backend {time.perf_counter() - encoded:.2f} s (merges {run})")


def test_hf_export_reloads_in_transformers(gemma, tmp_path):
    """The real model exported with save_hf (norms back to Hugging Face's w, tokenizer.json of Gemma's
    SentencePiece vocabulary): transformers loads the folder and gives llmos' logits and token ids, past
    the window too."""
    transformers = pytest.importorskip("transformers")
    from llmos.weights.export import save_hf

    folder = save_hf(gemma.model, gemma.config, gemma.tokenizer, tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    for text in TEXTS + PROMPTS:
        assert gemma.encode(text) == tokenizer.encode(text), text[:40]
    for prompt in (PROMPTS[1], LONG):
        ids = gemma.encode(prompt)
        with torch.no_grad():
            expected = model(torch.tensor([ids])).logits[0]
        assert (gemma.logits(ids) - expected).abs().max().item() < 1e-3, prompt[:40]


def test_gguf_export_keeps_the_tokenizer(gemma, gemma3_path, tmp_path):
    """The 262k-piece vocabulary exported to GGUF (under a small random model of the same family, so
    the file stays ~35 MB) holds the source file's pieces and types, in an order-keeping copy of its
    scores; gguf-py reads the fields llmos reads, and llmos and transformers give the source's ids."""
    import dataclasses

    import gguf
    transformers = pytest.importorskip("transformers")
    from llmos.weights.export import save_gguf
    from llmos.weights.load import build_model

    config = dataclasses.replace(gemma.config, n_layers=6, layer_types=gemma.config.layer_types[:6], dim=64, ffn_dim=128)
    torch.manual_seed(0)
    path = save_gguf(build_model(config, "cpu"), config, gemma.tokenizer, tmp_path / "gemma.gguf")
    with GGUFFile(gemma3_path) as f:
        source = f.metadata
    with GGUFFile(path) as f:
        metadata = f.metadata
    fields = {k: v for k, v in metadata.items() if k.startswith("tokenizer.")}
    assert fields == {k: f.contents() for k, f in gguf.GGUFReader(str(path)).fields.items() if k.startswith("tokenizer.")}
    for key in ("model", "tokens", "token_type", "bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id",
                "add_bos_token", "add_eos_token", "add_space_prefix"):
        assert fields[f"tokenizer.ggml.{key}"] == source[f"tokenizer.ggml.{key}"], key
    order = sorted(range(len(source["tokenizer.ggml.scores"])), key=lambda i: (-source["tokenizer.ggml.scores"][i], i))
    assert order == sorted(range(len(order)), key=lambda i: (-fields["tokenizer.ggml.scores"][i], i))
    back = Tokenizer.from_gguf(metadata)
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in TEXTS + PROMPTS:
        assert back.encode(text) == reference.encode(text) == gemma.encode(text), text[:40]


def test_the_files_own_form_gives_the_fp32_logits_and_keeps_no_fp32_copy(gemma, gemma3_path):
    """`--dtype gguf` (what auto picks for this file): the Q4_K/Q5_0/Q6_K/Q8_0 blocks as the file holds
    them, the 262,144 x 640 table once (head and embeddings), nothing dequantized to fp32 but the norms;
    on a short prompt (the row kernels, exactly the file's weights) the fp32 path's logits."""
    from llmos.gguf_linear import GGUFLinear

    own = llmos.load(gemma3_path, dtype="gguf", quiet=True)
    assert own.dtype == "gguf" and isinstance(own.model.output, GGUFLinear)
    tensors = [*own.model.parameters(), *own.model.buffers()]
    assert {t.dtype for t in tensors} == {torch.uint8, torch.float32}
    assert max(t.numel() for t in tensors if t.dtype == torch.float32) <= own.config.dim  # norms only
    assert sum(t.numel() for t in tensors if t.dtype == torch.uint8) < Path(gemma3_path).stat().st_size
    ids = gemma.encode(PROMPTS[1])
    assert (own.logits(ids) - gemma.logits(ids)).abs().max().item() < 1e-3
