"""LoRA: fine-tuning lowers held-out perplexity; merged and unmerged adapters compute the same; a run
keeps only its adapter and loads, converts and exports through its base."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import llmos
from llmos import derived, quant
from llmos.errors import LlmosError
from llmos.models.lora import (
    LoraConfig,
    LoRALinear,
    apply_lora,
    load_adapter,
    lora_state_dict,
    merge_lora,
    merged_state_dict,
    save_adapter,
)
from llmos.train.evaluate import perplexity
from llmos.train.loop import TrainConfig
from llmos.train.presets import init_weights, model_config
from llmos.train.run import finetune, load_adapter_run, load_base, load_run, pretrain
from llmos.weights.load import build_model


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, corpus_dir, tokenizer_file, tiny):
    """A tiny Llama pretrained on general sentences: it has never seen the domain."""
    cfg = TrainConfig(steps=120, batch_size=8, seq_len=64, lr=3e-3, warmup=10, eval_every=120, save_every=120)
    return pretrain([corpus_dir], tmp_path_factory.mktemp("base") / "base", tokenizer=tokenizer_file,
                    model_overrides=tiny, cfg=cfg, progress=False)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, base_run, domain_files):
    cfg = TrainConfig(steps=60, batch_size=8, seq_len=64, lr=3e-3, warmup=5, eval_every=30, save_every=30)
    lora = LoraConfig(rank=8, alpha=16, dropout=0.05, targets=("wqkv", "wo", "w13", "w2"))
    return finetune(base_run, [domain_files[0]], tmp_path_factory.mktemp("dom") / "dom", lora=lora, cfg=cfg,
                    progress=False)


def _logits(model: nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]), torch.arange(len(ids)))[0]


def test_lora_lowers_heldout_perplexity(lora_run, domain_files):
    heldout = [domain_files[1]]
    before = load_base(lora_run)
    after = load_run(lora_run)
    p0 = perplexity(before.model, before.tokenizer, heldout, seq_len=64)
    p1 = perplexity(after.model, after.tokenizer, heldout, seq_len=64)
    assert p0.tokens == p1.tokens > 100
    assert p1.ppl < 0.5 * p0.ppl, (p0, p1)


def test_merged_and_unmerged_give_the_same_logits(lora_run):
    unmerged = load_adapter_run(lora_run)  # base + adapter modules
    assert any(isinstance(m, LoRALinear) for m in unmerged.model.modules())
    merged_file = llmos.load(str(lora_run), dtype="fp32")  # base + adapter, merged at load time
    assert not any(isinstance(m, LoRALinear) for m in merged_file.model.modules())  # plain layers: base speed
    folded = copy.deepcopy(unmerged.model)
    merge_lora(folded)
    assert not any(isinstance(m, LoRALinear) for m in folded.modules())
    ids = unmerged.tokenizer.encode("In the Zorblax plant, pump P-117 is rated for 30 bar.")
    ref = _logits(unmerged.model, ids)
    assert (ref - _logits(folded, ids)).abs().max().item() < 1e-5
    assert (ref - merged_file.logits(ids)).abs().max().item() < 1e-5
    # And the adapter did change the model.
    assert (ref - _logits(load_base(lora_run).model, ids)).abs().max().item() > 1e-2


def test_lora_run_trains_and_saves_only_the_adapter(lora_run, base_run):
    # No merged copy of the weights (538 MB for the default model beside an 8 MB adapter): the adapter,
    # and what finds the base again.
    assert not (lora_run / "model.safetensors").exists() and not (lora_run / "config.json").exists()
    assert [p.name for p in lora_run.glob("*.safetensors")] == ["adapter.safetensors"]
    recipe = json.loads((lora_run / "run.json").read_text())
    assert recipe["base"] == str(base_run) and recipe["base_sha256"] == derived.content_key(base_run)
    cfg = json.loads((lora_run / "adapter_config.json").read_text())
    assert cfg["rank"] == 8 and len(cfg["modules"]) == 2 * 4  # 2 layers x 4 projections
    adapter = load_file(str(lora_run / "adapter.safetensors"))
    assert set(adapter) == {f"{m}.{p}" for m in cfg["modules"] for p in ("lora_a", "lora_b")}
    from llmos.train import checkpoint

    saved = load_file(str(checkpoint.latest(lora_run) / "model.safetensors"))
    assert set(saved) == set(adapter)  # checkpoints hold the trainable tensors only


def test_merge_flag_folds_the_adapter(tmp_path, base_run, domain_files):
    cfg = TrainConfig(steps=6, batch_size=4, seq_len=32, lr=3e-3, warmup=1, eval_every=6, save_every=6)
    run = finetune(base_run, [domain_files[0]], tmp_path / "m", lora=LoraConfig(rank=2, targets=("q_proj", "down_proj")),
                   merge=True, cfg=cfg, progress=False)
    assert not (run / "adapter.safetensors").exists()
    base = load_file(str(base_run / "model.safetensors"))
    tuned = load_file(str(run / "model.safetensors"))
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    # q_proj lives in the fused wqkv, so q, k and v change together; down_proj is w2.
    assert changed == {f"model.layers.{i}.{n}" for i in range(2) for n in
                       ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                        "mlp.down_proj.weight")}


def test_full_finetune_changes_every_weight(tmp_path, base_run, domain_files):
    cfg = TrainConfig(steps=4, batch_size=4, seq_len=32, lr=1e-3, warmup=1, eval_every=4, save_every=4)
    run = finetune(base_run, [domain_files[0]], tmp_path / "full", cfg=cfg, progress=False)
    base = load_file(str(base_run / "model.safetensors"))
    tuned = load_file(str(run / "model.safetensors"))
    assert all(not torch.equal(base[k], tuned[k]) for k in base)


def _tiny_model(arch: str, tiny: dict) -> nn.Module:
    torch.manual_seed(0)
    config = model_config("tiny", arch, 300, **tiny)
    model = build_model(config, "cpu")
    init_weights(model, config.n_layers)
    model.tie_weights()
    return model


def test_lora_targets_that_match_nothing_are_refused(tiny):
    model = _tiny_model("llama", tiny)
    with pytest.raises(LlmosError, match="'c_attn_typo' matches no linear layer.*wqkv"):
        apply_lora(model, LoraConfig(targets=("c_attn_typo",)))
    with pytest.raises(LlmosError, match="rank must be positive"):
        LoraConfig(rank=0)


def test_lora_starts_as_the_base_model_and_freezes_it(tiny):
    for arch in ("llama", "gpt2"):
        model = _tiny_model(arch, tiny)
        ids = list(range(20))
        before = _logits(model, ids)
        names = apply_lora(model, LoraConfig(rank=4, dropout=0.1))
        assert len(names) == 2 * 4
        model.eval()
        assert torch.equal(before, _logits(model, ids))  # B starts at zero
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable and all(n.endswith(("lora_a", "lora_b")) for n in trainable)
        # Patterns work on full names too; the vocabulary head only when named.
        other = _tiny_model(arch, tiny)
        assert apply_lora(other, LoraConfig(targets=("layers.1.attn.*",))) == ["layers.1.attn.wqkv", "layers.1.attn.wo"]


def test_adapter_save_load_round_trip(tmp_path, tiny):
    model = _tiny_model("llama", tiny)
    apply_lora(model, LoraConfig(rank=4, alpha=4, targets=("wqkv", "w2")))
    with torch.no_grad():
        for name, t in lora_state_dict(model).items():
            t.copy_(torch.randn_like(t) * 0.1)
    save_adapter(model, tmp_path, LoraConfig(rank=4, alpha=4, targets=("wqkv", "w2")))
    fresh = load_adapter(_tiny_model("llama", tiny), tmp_path)
    ids = list(range(30))
    model.eval(), fresh.eval()
    assert torch.equal(_logits(model, ids), _logits(fresh, ids))
    merged = merged_state_dict(model)
    assert "layers.0.attn.wqkv.weight" in merged and not any("lora" in k or ".base." in k for k in merged)


def test_lora_run_loads_in_a_fast_form_from_its_own_converted_copy(lora_run, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMOS_HOME", str(tmp_path / "home"))
    ref = llmos.load(str(lora_run), dtype="fp32")
    ids = ref.encode("In the Zorblax plant, valve V-101 is inspected every 7 days.")
    expected = ref.logits(ids)
    first = llmos.load(str(lora_run), dtype="int8")
    assert all(isinstance(first.model.get_submodule(n), quant.Int8Linear) for n in ("layers.0.attn.wqkv", "output"))
    copies = list((tmp_path / "home" / "converted").glob("*-int8.safetensors"))
    assert len(copies) == 1 and copies[0].name.startswith(derived.content_key(lora_run))
    again = llmos.load(str(lora_run), dtype="int8")  # read back from the converted copy
    for llm in (first, again):
        diff = (llm.logits(ids) - expected).abs().max().item()
        assert diff < 0.05 * expected.abs().max().item(), diff
    assert torch.equal(first.logits(ids), again.logits(ids))


def test_lora_run_refuses_a_changed_or_missing_base(tmp_path, base_run, domain_files):
    base = tmp_path / "base"
    shutil.copytree(base_run, base, ignore=shutil.ignore_patterns("checkpoints", "data"))
    cfg = TrainConfig(steps=2, batch_size=2, seq_len=32, lr=3e-3, warmup=1, eval_every=2, save_every=2)
    run = finetune(base, [domain_files[0]], tmp_path / "run", lora=LoraConfig(rank=2), cfg=cfg, progress=False)
    llmos.load(str(run), dtype="fp32")  # loads while the base is as it was
    weights = load_file(str(base / "model.safetensors"))
    name = next(iter(weights))
    weights[name] = weights[name] + 1
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(LlmosError, match=f"{base}, whose weights have changed"):
        llmos.load(str(run), dtype="fp32")
    shutil.rmtree(base)
    with pytest.raises(LlmosError, match=f"no longer at {base}"):
        llmos.load(str(run), dtype="fp32")


def test_export_of_a_lora_run_is_merged_and_loads_in_transformers(lora_run, tmp_path, llmos_cli):
    import transformers

    ref = llmos.load(str(lora_run), dtype="fp32")
    ids = ref.encode("In the Zorblax plant, pump P-117 is rated for 30 bar.")
    expected = ref.logits(ids)
    llmos_cli("export", str(lora_run), "--format", "hf", "-o", str(tmp_path / "hf"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (hf(torch.tensor([ids])).logits[0] - expected).abs().max().item() < 1e-4
    llmos_cli("export", str(lora_run), "--format", "gguf", "-o", str(tmp_path / "model.gguf"))
    gguf = llmos.load(str(tmp_path / "model.gguf"), dtype="fp32").logits(ids)
    assert (gguf - expected).abs().max().item() < 2e-3 * expected.abs().max().item()
