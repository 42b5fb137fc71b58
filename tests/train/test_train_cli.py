"""The training commands end to end: tokenizer, pretrain, finetune, eval, export, generate, errors."""

from __future__ import annotations

import json

import pytest

import llmos
from llmos.cli.main import main

TINY_ARGS = ["--dim", "64", "--layers", "2", "--heads", "4", "--context", "128", "--seq-len", "64", "--quiet"]


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory, corpus_dir, domain_files):
    """tokenizer train -> pretrain (GPT-2 shape) -> finetune --lora, all through the CLI."""
    root = tmp_path_factory.mktemp("cli")
    tok = root / "tok.json"
    assert main(["tokenizer", "train", str(corpus_dir), str(domain_files[0]), "--vocab", "400", "-o", str(tok)]) == 0
    base = root / "base"
    assert main(["pretrain", str(corpus_dir), "--arch", "gpt2", "--tokenizer", str(tok), "--out", str(base),
                 "--steps", "80", "--lr", "3e-3", "--warmup", "5", "--eval-every", "40", "--save-every", "40",
                 *TINY_ARGS]) == 0
    dom = root / "dom"
    assert main(["finetune", str(base), "--data", str(domain_files[0]), "--lora", "--rank", "4", "--targets",
                 "c_attn,c_fc", "--out", str(dom), "--steps", "40", "--lr", "3e-3", "--warmup", "2",
                 "--eval-every", "20", "--save-every", "20", "--seq-len", "64", "--quiet"]) == 0
    return tok, base, dom


def test_tokenizer_pretrain_finetune_chain(cli_runs):
    tok, base, dom = cli_runs
    assert json.loads(tok.read_text())["model"]["type"] == "BPE"
    recipe = json.loads((dom / "run.json").read_text())
    assert recipe["kind"] == "finetune" and recipe["lora"]["targets"] == ["c_attn", "c_fc"] and recipe["finished"]
    assert json.loads((dom / "adapter_config.json").read_text())["modules"] == [
        "layers.0.attn.wqkv", "layers.0.mlp.fc", "layers.1.attn.wqkv", "layers.1.mlp.fc"]


def test_generate_from_the_run_folder(cli_runs, capsys):
    _, _, dom = cli_runs
    assert main(["generate", "In the Zorblax plant,", "--model", str(dom), "-n", "8", "-t", "0", "--dtype", "fp32"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("In the Zorblax plant,") and len(out) > len("In the Zorblax plant,") + 5


def test_eval_perplexity_prints_before_and_after(cli_runs, domain_files, capsys):
    _, base, dom = cli_runs
    assert main(["eval", "perplexity", str(dom), "--data", str(domain_files[1]), "--seq-len", "64"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["model", "tokens", "loss", "perplexity"]
    assert "(before)" in lines[1] and "(after)" in lines[2] and lines[3].startswith("change")
    before, after = float(lines[1].split()[-1]), float(lines[2].split()[-1])
    assert after < before
    assert lines[1].split()[-3] == lines[2].split()[-3]  # same tokens scored
    assert main(["eval", "perplexity", str(base), "--data", str(domain_files[1])]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2  # a pretraining run has no "before"


def test_export_hf_and_gguf(cli_runs, tmp_path, capsys):
    _, _, dom = cli_runs
    ref = llmos.load(str(dom), dtype="fp32")
    ids = ref.encode("In the Zorblax plant, valve V-101 is inspected every 7 days.")
    assert main(["export", str(dom), "--format", "hf", "-o", str(tmp_path / "hf")]) == 0
    hf = llmos.load(str(tmp_path / "hf"), dtype="fp32")
    assert (hf.logits(ids) - ref.logits(ids)).abs().max().item() < 1e-5
    assert main(["export", str(dom), "--format", "gguf", "--type", "q8_0", "-o", str(tmp_path / "g")]) == 0
    path = tmp_path / "g" / "dom-q8_0.gguf"
    assert f"wrote {path}" in capsys.readouterr().err
    g = llmos.load(str(path), dtype="fp32")
    expected = ref.logits(ids)
    assert (g.logits(ids) - expected).abs().max().item() < 0.05 * expected.abs().max().item()


def test_resume_of_a_finished_run_is_a_no_op(cli_runs):
    _, base, _ = cli_runs
    before = (base / "model.safetensors").read_bytes()
    assert main(["pretrain", "--resume", str(base), "--quiet"]) == 0
    assert (base / "model.safetensors").read_bytes() == before


def test_bad_input_gives_one_clear_line(cli_runs, tmp_path, capsys):
    _, base, _ = cli_runs
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    assert main(["finetune", str(base), "--data", str(bad), "--out", str(tmp_path / "x"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:2" in err and "not valid JSON" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()  # refused before anything was written

    good = tmp_path / "good.txt"
    good.write_text("The pump is fine. " * 200)
    assert main(["finetune", str(base), "--data", str(good), "--lora", "--targets", "q_projj",
                 "--out", str(tmp_path / "y"), "--quiet", "--seq-len", "32"]) == 1
    assert "'q_projj' matches no linear layer" in capsys.readouterr().err

    assert main(["pretrain", "--resume", str(tmp_path / "nope")]) == 1
    assert "not a training run" in capsys.readouterr().err
    assert main(["finetune", str(base), "--data", str(good), "--merge", "--out", str(tmp_path / "z")]) == 1
    assert "add --lora" in capsys.readouterr().err
