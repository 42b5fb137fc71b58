"""bench/llama1b.py's file builder on a tiny shape: the synthetic tokenizer, the F16 writer, llama.cpp's
quantizer, the cache, and the bytes and bandwidth the floor is made of. The 1B files themselves are
the bench's business (minutes); this shape builds in a second."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench import llama1b

TINY = llama1b.Shape(layers=2, dim=256, heads=4, kv_heads=2, ffn=512, vocab=1024, specials=2)
Q4_K, Q6_K, Q8_0 = 12, 14, 8


def test_bpe_vocab_has_the_size_asked_and_every_merge_builds_a_piece_from_pieces() -> None:
    pieces, types, merges = llama1b.bpe_vocab(TINY)
    assert len(pieces) == len(types) == TINY.vocab
    assert len(set(pieces)) == len(pieces)
    assert pieces[-2:] == ["<|begin_of_text|>", "<|end_of_text|>"] and types[-2:] == [3, 3]
    known = set()
    rank = {p: i for i, p in enumerate(pieces)}
    for merge in merges:
        a, b = merge.split(" ")
        assert rank[a] < rank[a + b] and rank[b] < rank[a + b]
        known.add(a + b)
    assert known == set(pieces[256:-2])  # every normal piece past the bytes comes from exactly one merge
    with pytest.raises(ValueError, match="no room"):
        llama1b.bpe_vocab(llama1b.Shape(1, 256, 4, 2, 512, 300, specials=256))


def test_llama_1b_shape_matches_llama_3_2_1b() -> None:
    shape = llama1b.LLAMA_1B
    params = sum(math.prod(d) for _, d in llama1b.tensors(shape))
    assert (shape.layers, shape.dim, shape.heads, shape.kv_heads, shape.ffn, shape.vocab) == (16, 2048, 32, 8, 8192, 128_256)
    assert 1_235_000_000 < params < 1_236_000_000  # Llama 3.2 1B: 1.236 B with tied embeddings
    assert "output.weight" not in dict(llama1b.tensors(shape))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pytest.importorskip("llama_cpp")
    return llama1b.model_files(tmp_path_factory.mktemp("llama1b"), TINY, threads=1)


def test_quantized_files_have_llama_cpp_types_and_load_in_the_gguf_form(files: dict[str, Path]) -> None:
    import gguf

    from llmos.gguf_linear import GGUFLinear
    from llmos.weights.loader import load_model

    for form, allowed in (("q4_k_m", {Q4_K, Q6_K}), ("q8_0", {Q8_0})):
        reader = gguf.GGUFReader(str(files[form]))
        stored = {t.name: int(t.tensor_type) for t in reader.tensors}
        assert {q for n, q in stored.items() if not n.endswith("norm.weight")} <= allowed
        model, config, _ = load_model(files[form], "gguf")
        assert (config.n_layers, config.dim, config.n_kv_heads, config.vocab_size) == (2, 256, 2, 1024)
        layers = {n: m for n, m in model.named_modules() if isinstance(m, GGUFLinear)}
        for i in range(TINY.layers):  # each linear runs exactly the type its file tensor has
            p = f"blk.{i}."
            assert layers[f"layers.{i}.attn.wqkv"].qtypes == [stored[p + "attn_q.weight"], stored[p + "attn_k.weight"],
                                                               stored[p + "attn_v.weight"]]
            assert layers[f"layers.{i}.mlp.w13"].qtypes == [stored[p + "ffn_gate.weight"], stored[p + "ffn_up.weight"]]
            assert layers[f"layers.{i}.mlp.w2"].qtypes == [stored[p + "ffn_down.weight"]]
        assert layers["output"].qtypes == [stored["token_embd.weight"]]  # tied: the table is the head


def test_llmos_and_llama_cpp_read_the_synthetic_tokenizer_alike(files: dict[str, Path]) -> None:
    from llama_cpp import Llama

    import llmos

    theirs = Llama(str(files["q8_0"]), n_ctx=64, verbose=False)
    ours = llmos.load(str(files["q8_0"]), quiet=True, threads=1)
    text = "hello world, 1234 times"
    assert ours.encode(text) == theirs.tokenize(text.encode())
    assert theirs.n_vocab() == TINY.vocab


def test_cached_files_are_reused_and_a_damaged_one_rebuilt(files: dict[str, Path]) -> None:
    folder = files["f16"].parent
    stamps = {k: p.stat().st_mtime_ns for k, p in files.items()}
    assert llama1b.model_files(folder, TINY, threads=1) == files
    assert {k: p.stat().st_mtime_ns for k, p in files.items()} == stamps
    size = files["q8_0"].stat().st_size
    with open(files["q8_0"], "r+b") as f:
        f.truncate(size // 2)
    llama1b.model_files(folder, TINY, threads=1)
    assert files["q8_0"].stat().st_size == size
    assert files["f16"].stat().st_mtime_ns == stamps["f16"]  # the F16 source was kept


def test_decode_bytes_count_the_tied_table_once_and_bandwidth_is_positive(files: dict[str, Path]) -> None:
    import gguf

    reader = gguf.GGUFReader(str(files["q4_k_m"]))
    assert llama1b.decode_bytes(files["q4_k_m"]) == sum(int(t.n_bytes) for t in reader.tensors)
    assert llama1b.read_bandwidth(1, nbytes=1 << 24, reps=2) > 1e8
