"""The "gguf" form (the file's own blocks, gguf_linear.py) through the production loader: a tiny random
Llama written to GGUF with its linear weights in each GGML type gives the logits of the fp32 model of
the same file's dequantized weights (the loader's fp32 form) within 1e-4 on the row kernels, and
within bf16 rounding on the dense prefill path; cached decode equals a full forward; the tied table
is kept once, as the file's blocks, with no fp32 copy of any matrix; llama's q/k rows come out in the
order the model wants (un-permuted like the fp32 path: the logits test fails without it)."""

from __future__ import annotations

import warnings
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from torch import nn

import llmos
from llmos import derived, quality
from llmos.engine import gguf_kernels, native
from llmos.engine.generate import Generation
from llmos.engine.sampling import SamplingParams
from llmos.errors import LlmosError
from llmos.gguf_linear import DENSE_ROWS, QTYPES, GGUFEmbedding, GGUFLinear
from llmos.models.kernels import PYTORCH
from llmos.weights.loader import kv_dtype, load_model
from tests.engine.gguf_blocks import NAMES, random_blocks
from tests.models.hf_reference import cached_vs_full
from tests.weights.tiny_checkpoints import write_gguf

SHAPE = {"n_layers": 2, "dim": 256, "heads": 4, "kv": 2, "ffn": 512}
# Gemma 3's Q4_K_M file mixes types per tensor; this mix puts them in one fused layer too.
MIXED = {"attn_q": 6, "attn_k": 6, "attn_v": 8, "attn_output": 12, "ffn_gate": 6, "ffn_up": 13, "ffn_down": 14,
         "token_embd": 8}


def write(path: Path, types: dict[str, int]) -> Path:
    """The tiny Llama as GGUF, every 2-D tensor stored in types[short name] (a GGML type id; 0 is F32)."""
    rng = np.random.default_rng(1)

    def encode(name: str, arr: np.ndarray) -> tuple[np.ndarray, int | None]:
        if arr.ndim != 2:
            return arr, None
        qtype = types[name.split(".")[-2] if name.startswith("blk.") else name.split(".")[0]]
        if qtype == 0:
            return arr, None
        try:
            return gguf.quants.quantize(arr, gguf.GGMLQuantizationType(qtype)), qtype
        except (NotImplementedError, gguf.quants.QuantError):  # gguf 0.19 has no K-quant quantizer
            return random_blocks(qtype, *arr.shape, rng, "small"), qtype

    return write_gguf(path, shape=SHAPE, encode=encode)


CASES = {NAMES[t]: {k: t for k in MIXED} for t in sorted(NAMES)} | {"Q4_K_M-like mix": MIXED}


@pytest.fixture(scope="module", params=list(CASES))
def models(request, tmp_path_factory):
    path = write(tmp_path_factory.mktemp("gguf") / "tiny.gguf", CASES[request.param])
    reference, config, _ = load_model(path, "fp32")  # the production loader, fp32 dequantized weights
    model, _, _ = load_model(path, "gguf", kernels=native.kernels())
    return reference, model, config


@torch.inference_mode()
def test_logits_equal_the_dequantized_fp32_model(models):
    reference, model, _ = models
    tokens = torch.tensor([[1, 17, 200, 33, 90, 5, 250]])  # 7 rows: the row kernels
    assert tokens.shape[1] < DENSE_ROWS
    want = reference(tokens, torch.arange(7))
    got = model(tokens, torch.arange(7))
    assert (got - want).abs().max().item() < 1e-4 * want.abs().max().item()  # relative: these logits are small
    assert torch.equal(model.embed(tokens), reference.embed(tokens))


@torch.inference_mode()
def test_each_layer_holds_the_weight_the_model_wants_row_for_row(models):
    """The fused q/k/v rows are the fp32 path's, bit for bit: llama's q/k row permutation is undone on
    the blocks (a row is its own blocks), where a tiny random model's logits barely notice it."""
    reference, model, _ = models
    for name, layer in model.named_modules():
        if isinstance(layer, GGUFLinear) and name != "output":
            assert torch.equal(layer.dequantized(), reference.get_submodule(name).weight), name
    assert torch.equal(model.output.dequantized(), reference.embed.weight)


@torch.inference_mode()
def test_every_linear_runs_the_files_blocks_and_the_table_is_kept_once(models):
    _, model, config = models
    linears = [m for m in model.modules() if isinstance(m, (nn.Linear, GGUFLinear))]
    assert len(linears) == 4 * config.n_layers + 1 and all(isinstance(m, GGUFLinear) for m in linears)
    assert isinstance(model.embed, GGUFEmbedding) and model.embed.table is model.output  # tied: one table
    wqkv = model.layers[0].attn.wqkv
    assert len(wqkv.part_rows) == 3 and wqkv.out_features == (config.n_heads + 2 * config.n_kv_heads) * config.head_size
    # No fp32 copy of any matrix: every 2-D tensor is the file's blocks (uint8); fp32 only for the norms.
    by_dtype: dict[torch.dtype, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        by_dtype[t.dtype] = by_dtype.get(t.dtype, 0) + t.numel() * t.element_size()
    assert set(by_dtype) == {torch.uint8, torch.float32}
    assert by_dtype[torch.float32] == 4 * (2 * config.n_layers + 1) * config.dim  # the RMSNorm weights
    assert not any(t.dim() == 2 and t.dtype != torch.uint8 for t in model.state_dict().values())


@torch.inference_mode()
def test_the_native_step_calls_the_gguf_layers_and_gets_the_python_steps_logits(models):
    """The C++ decode step runs a GGUF model, calling each GGUFLinear's kernels (they live in another
    extension) straight from C++: logits within 1e-5 of the Python step's relative to their size (these
    logits are small), with shared and per-row positions."""
    _, model, config = models
    if native.build(quiet=True) is None:
        pytest.skip(f"native step not built here: {native.failure()}")
    step = native.stepper(model)
    assert step is not None
    from llmos.models.kv_cache import KVCache

    prompt = torch.tensor([[1, 17, 200, 33, 90], [5, 250, 3, 40, 41]])
    fast, slow = (KVCache.for_model(config, 2, 16) for _ in range(2))
    model.hidden(prompt, torch.arange(5), fast)
    model.hidden(prompt, torch.arange(5), slow)
    for i, positions in enumerate((torch.tensor([5]), torch.tensor([[6], [6]]), torch.tensor([7]))):
        tokens = torch.tensor([7 + i, 90 - i])
        got = step(tokens, positions, fast)
        want = model.logits(model.hidden(tokens[:, None], positions, slow)[:, -1]).float()
        assert (got - want).abs().max().item() < 1e-5 * max(1.0, want.abs().max().item()), i


@torch.inference_mode()
def test_the_native_step_runs_the_gguf_kernels_without_python_and_gets_the_bits_of_their_forward(models, monkeypatch):
    """The step calls the GGUF layers' kernels from C++ (their Python forward is never called), each part
    writing its columns of a fused layer's output: the logits and caches are bit for bit those of the
    step that calls each layer's forward (what runs where the GGUF extension is not built)."""
    _, model, config = models
    if native.build(quiet=True) is None or gguf_kernels.build(quiet=True) is None:
        pytest.skip(f"native kernels not built here: {native.failure() or gguf_kernels.failure()}")
    from llmos.models.kv_cache import KVCache

    calls = []
    forward = GGUFLinear.forward
    monkeypatch.setattr(GGUFLinear, "forward", lambda self, x: calls.append(self) or forward(self, x))
    direct = native.stepper(model)
    with monkeypatch.context() as patch:
        patch.setattr(gguf_kernels, "build", lambda quiet=False: None)
        through_python = native.stepper(model)
    prompt = torch.tensor([[1, 17, 200, 33, 90], [5, 250, 3, 40, 41]])
    caches = [KVCache.for_model(config, 2, 16) for _ in range(2)]
    for cache in caches:
        model.hidden(prompt, torch.arange(5), cache)
    for i, positions in enumerate((torch.tensor([5]), torch.tensor([[6], [6]]), torch.tensor([7]))):
        tokens = torch.tensor([7 + i, 90 - i])
        calls.clear()
        got = direct(tokens, positions, caches[0])
        assert not calls
        want = through_python(tokens, positions, caches[1])
        assert len(calls) == 4 * config.n_layers + 1  # the other step did call them: the test sees the difference
        assert torch.equal(got, want), i
        assert torch.equal(caches[0].k, caches[1].k) and torch.equal(caches[0].v, caches[1].v)


@torch.inference_mode()
def test_a_row_in_a_batch_equals_it_alone(models):
    _, model, _ = models
    tokens = torch.tensor([[3, 40, 41], [3, 40, 99]])
    both = model(tokens, torch.arange(3))
    assert torch.equal(both[1:], model(tokens[1:], torch.arange(3)))


@torch.inference_mode()
def test_prefill_runs_the_dense_bf16_path(models):
    reference, model, _ = models
    tokens = torch.arange(3, 3 + 2 * DENSE_ROWS)[None]
    want = reference(tokens, torch.arange(tokens.shape[1]))
    got = model(tokens, torch.arange(tokens.shape[1]))
    assert (got - want).abs().max().item() < 3e-2 * max(1.0, want.abs().max().item())  # bf16 weights and activations


def test_cached_decode_equals_a_full_forward(models):
    _, model, config = models
    assert cached_vs_full(model, config, length=24, prompt=6) < 1e-4  # every position on the row kernels


@torch.inference_mode()
def test_pytorch_kernels_give_the_same_logits(tmp_path):
    """Without the extension (PyTorch's kernels: Python dequantization, fp32 matmul), the same numbers."""
    path = write(tmp_path / "mix.gguf", MIXED)
    fast, _, _ = load_model(path, "gguf", kernels=native.kernels())
    plain, _, _ = load_model(path, "gguf", kernels=PYTORCH)
    tokens = torch.tensor([[5, 6, 7, 8]])
    want = fast(tokens, torch.arange(4))
    assert (plain(tokens, torch.arange(4)) - want).abs().max().item() < 1e-4 * max(1.0, want.abs().max().item())


def test_the_kernels_and_the_layer_agree_on_the_types():
    assert QTYPES == gguf_kernels.QTYPES


@torch.inference_mode()
def test_a_type_without_a_kernel_loads_dequantized_with_a_warning(tmp_path):
    types = dict(MIXED, ffn_down=1, attn_output=0)  # F16 (no kernel) and F32 (the file's own)
    path = write(tmp_path / "f16.gguf", types)
    with pytest.warns(UserWarning, match=r"2 weights .* stored as F16"):
        model, _, _ = load_model(path, "gguf")
    assert isinstance(model.layers[0].mlp.w2, nn.Linear) and model.layers[0].mlp.w2.weight.dtype == torch.float32
    assert isinstance(model.layers[0].attn.wo, nn.Linear) and isinstance(model.layers[0].mlp.w13, GGUFLinear)
    reference, _, _ = load_model(path, "fp32")
    tokens = torch.tensor([[9, 8, 7]])
    assert (model(tokens, torch.arange(3)) - reference(tokens, torch.arange(3))).abs().max().item() < 1e-4
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a file of F32 and kernel types alone loads without a word
        load_model(write(tmp_path / "f32.gguf", dict(MIXED, attn_output=0)), "gguf")


def test_generation_and_the_cli_take_the_gguf_form(tmp_path, llmos_run):
    path = write(tmp_path / "q8.gguf", {k: 8 for k in MIXED})
    llm = llmos.load(path, dtype="gguf", quiet=True)
    assert llm.dtype == "gguf" and llm.kv_dtype == kv_dtype("gguf") == torch.float16
    assert isinstance(llm.model.output, GGUFLinear)
    got = llm.generate("hello", max_new_tokens=8, min_new_tokens=8, temperature=0.0).token_ids
    reference, _, _ = load_model(path, "fp32")  # greedy on the dequantized weights, the same fp16 cache
    want = list(Generation(reference, llm.encode("hello"), max_new_tokens=8, min_new_tokens=8,
                           params=SamplingParams(temperature=0.0), kv_dtype=torch.float16).tokens())
    assert got == want and len(got) == 8
    done = llmos_run("generate", "--model", str(path), "--dtype", "gguf", "-n", "4", "--temperature", "0", "hello")
    assert done.returncode == 0, done.stderr


def test_the_gguf_form_refuses_a_model_that_is_not_a_gguf_file(tmp_path):
    from tests.weights.tiny_checkpoints import write_hf

    folder = write_hf(tmp_path / "hf")
    with pytest.raises(LlmosError, match="not a GGUF file"):
        load_model(folder, "gguf")


def test_auto_runs_the_files_own_form_except_for_q4_1_layers(tmp_path, default_gguf_path, gemma3_path):
    mixed = write(tmp_path / "mix.gguf", MIXED)
    assert quality.runs_own_form(mixed) and quality.runs_own_form(Path(gemma3_path))  # Q4_K_M: its own blocks
    assert quality.auto_form(mixed, kernels=native.kernels()) == "gguf"
    assert not derived.verdict_file(mixed).exists()  # decided without measuring
    # Q4_1 layers (the default model, its table in Q8_0) are int4's own bits: auto measures, as before
    q4_1 = write(tmp_path / "q4_1.gguf", dict({k: 3 for k in MIXED}, token_embd=8))
    assert not quality.runs_own_form(q4_1) and not quality.runs_own_form(Path(default_gguf_path))
    assert quality.forms_of(q4_1) == ("fp32", "bf16", "int8", "int4", "gguf")  # llmos bench shows it beside them
    assert "gguf" not in quality.forms_of(write(tmp_path / "f32.gguf", {k: 0 for k in MIXED}))
    # PyTorch's kernels would dequantize the blocks every call: auto does not pick the form for them
    assert quality.native_blocks(native.kernels()) and not quality.native_blocks(PYTORCH)


@torch.inference_mode()
def test_an_untied_head_and_table_each_keep_their_own_blocks(tmp_path, monkeypatch):
    from tests.weights import tiny_checkpoints

    plain = tiny_checkpoints.llama_tensors

    def with_head(vocab: int, *args, **kwargs) -> dict[str, np.ndarray]:
        tensors = plain(vocab, *args, **kwargs)
        return tensors | {"output.weight": tensors["token_embd.weight"][::-1].copy()}  # a head of its own

    monkeypatch.setattr(tiny_checkpoints, "llama_tensors", with_head)
    path = write(tmp_path / "untied.gguf", dict(MIXED, output=6))  # the table Q8_0, the head Q5_0
    reference, config, _ = load_model(path, "fp32")
    model, _, _ = load_model(path, "gguf", kernels=native.kernels())
    assert not config.tie_embeddings
    assert isinstance(model.output, GGUFLinear) and model.output.qtypes == [6]
    assert isinstance(model.embed, GGUFEmbedding) and model.embed.table is not model.output
    assert {n.split(".")[0] for n in model.state_dict() if n.endswith("raw0") and "layers" not in n} == {"embed", "output"}
    tokens = torch.tensor([[1, 17, 200, 33]])
    want = reference(tokens, torch.arange(4))
    assert (model(tokens, torch.arange(4)) - want).abs().max().item() < 1e-4 * want.abs().max().item()


def test_the_batch_engine_gives_each_request_its_solo_tokens(models):
    """Continuous batching over gguf layers (per-row positions, rows decoded together): each request
    gets the greedy tokens it gets alone, as the row kernels promise."""
    from llmos.engine.batch import BatchEngine, Request

    _, model, _ = models
    prompts = [[256, 40, 41, 42], [256, 7, 8], [256, 100, 101, 102, 103, 104]]
    solo = [list(Generation(model, p, max_new_tokens=6, min_new_tokens=6, params=SamplingParams(temperature=0.0),
                            kv_dtype=torch.float16).tokens()) for p in prompts]
    with torch.inference_mode():
        done = BatchEngine(model, max_batch=4, kv_dtype=torch.float16).run(
            [Request(p, max_new_tokens=6, min_new_tokens=6) for p in prompts])
    assert [r.output for r in done] == solo
