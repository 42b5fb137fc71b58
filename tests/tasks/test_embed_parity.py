"""Embeddings: parity with sentence-transformers on the default model, truncation reported, batch
invariance, and the BERT loader against transformers on a tiny random config."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from llmos.errors import LlmosError

BASE = [
    "The cat sits on the mat.",
    "A man is playing a guitar on stage.",
    "How do I rotate the API key?",
    "Backups run nightly at 02:00 UTC.",
    "Python's for statement iterates over the items of any sequence.",
    "Quantum computers use qubits instead of bits.",
    "She sells sea shells by the sea shore.",
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France?",
    "Paris is the capital and most populous city of France.",
    "Le chat est assis sur le tapis.",
    "Où se trouve la gare, s'il vous plaît ?",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "Straße, Größe, Übermaß: Umlaute und Eszett.",
    "El rápido zorro marrón salta sobre el perro perezoso.",
    "¿Dónde está la biblioteca?",
    "Il gatto dorme sul divano.",
    "O rato roeu a roupa do rei de Roma.",
    "Быстрая коричневая лиса прыгает через ленивую собаку.",
    "Москва — столица России.",
    "敏捷的棕色狐狸跳过了懒狗。",
    "北京是中国的首都。",
    "素早い茶色の狐が怠惰な犬を飛び越える。",
    "東京は日本の首都です。",
    "빠른 갈색 여우가 게으른 개를 뛰어넘습니다.",
    "الثعلب البني السريع يقفز فوق الكلب الكسول.",
    "השועל החום המהיר קופץ מעל הכלב העצלן.",
    "Η γρήγορη καφέ αλεπού πηδά πάνω από τον τεμπέλη σκύλο.",
    "तेज़ भूरी लोमड़ी आलसी कुत्ते के ऊपर कूदती है।",
    "Szybki brązowy lis przeskakuje nad leniwym psem.",
    "Emoji test 🚀🔥 with mixed content ✓",
    "x",
    "",
    "   leading and trailing spaces   ",
    "UPPER CASE AND lower case MiXeD",
    "Numbers 3.14159, 2.71828 and 1,000,000.",
    "def f(x):\n    return x ** 2  # code with newlines",
    "https://example.com/path?query=1&other=two",
    "Tabs\tand\nnewlines\r\nare whitespace.",
    "A sentence with a very rare word: floccinaucinihilipilification.",
]
LONG = [
    " ".join(["The history of the city spans many centuries of trade, war and art."] * 30),  # ~450 tokens
    " ".join(f"item{i}" for i in range(400)),  # many word pieces
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 40,
    ("Ein sehr langer deutscher Satz über Donaudampfschifffahrtsgesellschaftskapitäne und ihre Mützen. " * 25),
    "长文本测试。" * 200,
    " ".join(["word"] * 254),  # exactly 256 tokens with [CLS] and [SEP]: not truncated
    " ".join(["word"] * 255),  # 257: truncated
    "A short tail after padding-heavy batches.",
    "Medium length sentence " * 20,
    "Another medium one with punctuation; commas, and dots. " * 12,
]
SENTENCES = BASE + LONG


@pytest.fixture(scope="module")
def reference(embed_model_path):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    return sentence_transformers.SentenceTransformer(str(embed_model_path), device="cpu")


def test_cosine_with_sentence_transformers(embedder, reference):
    assert len(SENTENCES) == 50
    expected = reference.encode(SENTENCES, batch_size=16, convert_to_numpy=True)
    got = embedder.embed(SENTENCES, batch_size=16)
    assert got.vectors.shape == expected.shape == (50, 384)
    cos = (got.vectors * expected).sum(1) / (np.linalg.norm(got.vectors, axis=1) * np.linalg.norm(expected, axis=1))
    assert cos.min() >= 0.9999, f"worst {cos.min()} at {SENTENCES[int(cos.argmin())][:40]!r}"
    # Both truncate at sentence_bert_config.json's max_seq_length; llmos says which inputs it cut.
    assert embedder.max_tokens == reference.max_seq_length == 256
    long_ones = {i for i, s in enumerate(SENTENCES) if embedder.count_tokens(s) > 256}
    assert set(got.truncated) == long_ones
    assert len(long_ones) >= 5 and SENTENCES.index(LONG[5]) not in long_ones and SENTENCES.index(LONG[6]) in long_ones
    assert np.allclose(np.linalg.norm(got.vectors, axis=1), 1.0, atol=1e-5)  # the Normalize module


def test_vector_does_not_depend_on_batch(embedder):
    texts = ["short", "a much longer sentence that forces padding of the short one in its batch " * 3]
    together = embedder.embed(texts, batch_size=2).vectors
    alone = np.stack([embedder.embed([t]).vectors[0] for t in texts])
    assert np.abs(together - alone).max() < 1e-5


def test_embed_rejects_bad_input(embedder):
    with pytest.raises(LlmosError):
        embedder.embed_query("   ")
    with pytest.raises(LlmosError):
        embedder.embed([1, 2])  # type: ignore[list-item]


def test_tiny_bert_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from llmos.weights.load import load_bert, read_hf_config

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=120, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=96, max_position_embeddings=64)
    ref = transformers.BertModel(config, add_pooling_layer=True).eval()
    with torch.no_grad():  # random init leaves biases and norms trivial; make them count
        for name, p in ref.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    ref.save_pretrained(tmp_path)
    model = load_bert(tmp_path, read_hf_config(tmp_path))
    tokens = torch.randint(0, 120, (3, 20))
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[1, 12:] = 0
    mask[2, 5:] = 0
    types = torch.randint(0, 2, (3, 20))
    with torch.no_grad():
        expected = ref(input_ids=tokens, attention_mask=mask, token_type_ids=types).last_hidden_state
        got = model(tokens, mask, types)
    real = mask.bool()
    assert torch.allclose(got[real], expected[real], atol=1e-5)


def test_loading_the_encoder_imports_no_compiler(embed_model_path):
    """Building the encoder on the meta device without its random init: `normal_` there goes through
    torch's reference ops, which import torch._dynamo (1.3 s of every `llmos search` / `ask`)."""
    code = ("import sys; from llmos.tasks.embed import Embedder; e = Embedder.load(sys.argv[1]); "
            "v = e.embed(['a test sentence']); print(v.vectors.shape[1], 'torch._dynamo' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code, str(embed_model_path)], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["384", "False"]
