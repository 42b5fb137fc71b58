"""Requests that set no sampling controls get the model's recommended sampling (not OpenAI's
temperature 1, which ran away on the small default model) and a max_tokens that fits it; both are
printed at start-up and the --default-* flags override them."""

from __future__ import annotations

import json
import shutil

from llmos import store
from llmos.api import DEFAULT_SAMPLING
from llmos.serve.server import ServeConfig, sampling_defaults


def test_the_default_model_gets_its_model_cards_sampling(default_gguf_path):
    from pathlib import Path

    assert sampling_defaults(Path(default_gguf_path), {}) == {"temperature": 0.2, "top_p": 0.9, "top_k": 0}
    assert sampling_defaults(Path(default_gguf_path), {"temperature": 0.7}) == {"temperature": 0.7, "top_p": 0.9, "top_k": 0}
    assert ServeConfig().default_max_tokens == 512


def test_a_folder_gets_its_generation_config_or_llmos_defaults(tiny_model, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_model, folder)
    (folder / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.6, "top_p": 0.95,
                                                                "top_k": 20, "eos_token_id": 2}))
    assert store.recommended_sampling(folder) == {"temperature": 0.6, "top_p": 0.95, "top_k": 20}
    assert sampling_defaults(folder, {}) == {"temperature": 0.6, "top_p": 0.95, "top_k": 20}
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    assert sampling_defaults(folder, {}) == DEFAULT_SAMPLING


def test_serve_prints_its_defaults_and_requests_get_them(serve_process, tiny_model, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_model, folder)
    (folder / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_p": 0.95}))
    server = serve_process(str(folder), "--dtype", "fp32", "--default-temperature", "0", "--default-max-tokens", "7",
                           log=tmp_path / "serve.log")
    try:
        server.wait_ready()
        with server.client() as client:
            outs = [client.post("/v1/completions", json={"model": folder.name, "prompt": "Once", "seed": seed}).json()
                    for seed in (1, 2)]
    finally:
        server.stop()
    log = server.log()
    assert "requests that set none get temperature 0, top_p 0.95, top_k 0, max_tokens 7" in log
    assert [o["usage"]["completion_tokens"] for o in outs] == [7, 7]
    assert outs[0]["choices"][0]["text"] == outs[1]["choices"][0]["text"]  # temperature 0 from the flag: greedy


def test_a_copy_of_the_default_model_gets_its_sampling_too(default_gguf_path, tmp_path):
    """The model card's sampling follows the file's content, not its place in the store."""
    copy = tmp_path / "elsewhere.gguf"
    shutil.copyfile(default_gguf_path, copy)
    assert store.recommended_sampling(copy) == {"temperature": 0.2, "top_p": 0.9}
    other = tmp_path / "changed.gguf"  # same size, one byte different: not the model the card is about
    data = bytearray(copy.read_bytes())
    data[-1] ^= 1
    other.write_bytes(bytes(data))
    assert store.recommended_sampling(other) == {}
