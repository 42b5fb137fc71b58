"""Model files are untrusted: a sharded checkpoint cannot make llmos read outside its folder, and config
values are checked against the tensors actually present before anything of their size is allocated.
Each refusal is one LlmosError line naming what to fix, and comes fast."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from llmos.errors import LlmosError
from llmos.weights.loader import load_model
from tiny_checkpoints import write_gguf, write_hf


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def refused(path: Path, *words: str, seconds: float = 10.0) -> str:
    """Loading `path` fails with one LlmosError line holding `words`, within `seconds`."""
    start = time.monotonic()
    with pytest.raises(LlmosError) as info:
        load_model(path, "fp32", use_cache=False)
    message = str(info.value)
    assert time.monotonic() - start < seconds, message
    assert "\n" not in message and all(w in message for w in words), message
    return message


# --- 7. shards outside the folder -------------------------------------------------------------------------------


def sharded(tmp_path: Path, shard_for: str) -> Path:
    """A model folder whose index maps every tensor to `shard_for` (its real file moved next to the folder)."""
    from safetensors import safe_open

    folder = write_hf(tmp_path / "models" / "m")
    names = list(safe_open(str(folder / "model.safetensors"), "pt").keys())
    shutil.copy(folder / "model.safetensors", tmp_path / "secret.safetensors")
    shutil.move(folder / "model.safetensors", tmp_path / "models" / "secret.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: shard_for for n in names}}))
    return folder


@pytest.mark.parametrize("shard", ["../secret.safetensors", "../../secret.safetensors", "sub/../../secret.safetensors",
                                   "ABSOLUTE", "link.safetensors"])
def test_shards_must_resolve_inside_the_model_folder(tmp_path, shard):
    if shard == "ABSOLUTE":
        shard = str(tmp_path / "secret.safetensors")
    folder = sharded(tmp_path, shard)
    os.symlink(tmp_path / "secret.safetensors", folder / "link.safetensors")  # a symlink out of the folder
    refused(folder, "outside the model folder", repr(shard))


def test_shards_inside_the_folder_and_hf_cache_links_load(tmp_path):
    folder = sharded(tmp_path, "weights/part-1.safetensors")
    (folder / "weights").mkdir()
    shutil.move(tmp_path / "models" / "secret.safetensors", folder / "weights" / "part-1.safetensors")
    assert load_model(folder, "fp32", use_cache=False)[1].n_layers == 2
    # the Hugging Face cache: snapshots/<rev>/file -> ../../blobs/<hash>
    repo = tmp_path / "models--org--m"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    shutil.copytree(write_hf(tmp_path / "plain"), snap)
    (snap / "model.safetensors").rename(repo / "blobs" / "f00d")
    os.symlink("../../blobs/f00d", snap / "model.safetensors")
    shutil.copy(folder / "model.safetensors.index.json", snap / "model.safetensors.index.json")
    index = json.loads((snap / "model.safetensors.index.json").read_text())
    index["weight_map"] = {n: "model.safetensors" for n in index["weight_map"]}
    (snap / "model.safetensors.index.json").write_text(json.dumps(index))
    assert load_model(snap, "fp32", use_cache=False)[1].n_layers == 2


def test_a_tensor_listed_twice_is_refused(tmp_path):
    folder = sharded(tmp_path, "model.safetensors")
    shutil.move(tmp_path / "models" / "secret.safetensors", folder / "model.safetensors")
    text = (folder / "model.safetensors.index.json").read_text()
    first = next(iter(json.loads(text)["weight_map"]))
    (folder / "model.safetensors.index.json").write_text(text.replace("{", "{" + f'"{first}": "model.safetensors", ', 2))
    refused(folder, "listed twice")


# --- 8. config values are checked before they are trusted -----------------------------------------------------


@pytest.mark.parametrize("override, words", [
    ({"num_hidden_layers": 10 ** 6}, ("n_layers", "1000000", "layers 0..1")),
    ({"num_hidden_layers": 1}, ("n_layers",)),
    ({"hidden_size": 1 << 20}, ("dim", "hidden_size")),
    ({"vocab_size": 1 << 31}, ("vocab_size", "2147483648")),
    ({"intermediate_size": 48}, ("ffn_dim", "intermediate_size")),
    ({"num_key_value_heads": 4}, ("n_kv_heads",)),
    ({"head_dim": 16}, ("head_size",)),
    ({"hidden_size": "32"}, ("dim", "integer")),
    ({"rope_theta": "fast"}, ("config.json",)),
    ({"num_attention_heads": None}, ("num_attention_heads",)),
    ({"num_attention_heads": 0}, ("num_attention_heads", "positive")),
    ({"max_position_embeddings": -5}, ("max_seq_len", "positive")),
])
def test_hf_config_values_that_do_not_fit_the_tensors(tmp_path, override, words):
    folder = write_hf(tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config.update(override)
    if override.get("num_attention_heads", 0) is None:
        del config["num_attention_heads"]
    (folder / "config.json").write_text(json.dumps(config))
    refused(folder, *words)


@pytest.mark.parametrize("override, words", [
    ({"n_layers": 100_000}, ("n_layers", "block_count", "100000")),
    ({"dim": 1 << 20}, ("dim", "embedding_length")),
    ({"ffn": 96}, ("ffn_dim", "feed_forward_length")),
    ({"heads": 8}, ("n_heads",)),
    ({"heads": 0}, ("head_count", "positive")),  # found by the file fuzzer: a ZeroDivisionError before
])
def test_gguf_metadata_that_does_not_fit_the_tensors(tmp_path, override, words):
    refused(write_gguf(tmp_path / "m.gguf", override), *words, seconds=5)


def test_gguf_vocab_size_and_types_are_checked(tmp_path):
    import gguf

    from llmos.weights.gguf import GGUFFile

    path = write_gguf(tmp_path / "m.gguf")
    with GGUFFile(path) as g:
        metadata = dict(g.metadata)
    for key, value, words in (("llama.vocab_size", 1 << 31, ("vocab_size",)),
                              ("llama.context_length", "long", ("llama.context_length", "number"))):
        out = tmp_path / f"{key}.gguf"
        w = gguf.GGUFWriter(str(out), "llama")
        for k, v in metadata.items():
            if k not in ("general.architecture", "GGUF.version", "GGUF.tensor_count", "GGUF.kv_count") and k != key:
                w.add_key_value(k, v, _vtype(v, gguf)) if not isinstance(v, list) else w.add_array(k, v)
        w.add_key_value(key, value, _vtype(value, gguf))
        with GGUFFile(path) as g:
            for name in g.tensors:
                w.add_tensor(name, g.tensor(name).numpy())
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        refused(out, *words)


def _vtype(value, gguf):
    if isinstance(value, bool):
        return gguf.GGUFValueType.BOOL
    if isinstance(value, int):
        return gguf.GGUFValueType.UINT64 if value >= 1 << 31 else gguf.GGUFValueType.UINT32
    if isinstance(value, float):
        return gguf.GGUFValueType.FLOAT32
    return gguf.GGUFValueType.STRING


def test_errors_quoting_a_librarys_multi_line_text_stay_one_line():
    """Found by the file fuzzer: a GGUF token that is not valid UTF-8 made the tokenizers library
    raise a three-line error, which the refusal quoted."""
    assert str(LlmosError("cannot build the tokenizer: failed\n- variant A: x\n- variant B: y")) == \
        "cannot build the tokenizer: failed; - variant A: x; - variant B: y"


def test_absurd_sizes_are_refused_before_any_model_is_built(tmp_path):
    """Found by the file fuzzer: block_count 2^31 made a set of 2^31 layer numbers (MemoryError), and
    embedding_length 2^31 overflowed even a meta-device tensor."""
    refused(write_gguf(tmp_path / "layers.gguf", {"n_layers": 2 ** 31}), "n_layers", seconds=5)
    refused(write_gguf(tmp_path / "dim.gguf", {"dim": 2 ** 31}), "2147483648", seconds=5)
