"""No hidden costs on disk, and no silent first load: converted copies are keyed by content (one per
model, whatever path names it), shown by `llmos list`, freed by `llmos rm` and `llmos prune`; the
first load of a model says what it is doing and how far it is."""

from __future__ import annotations

import os


def test_first_load_says_so_and_converted_copies_are_listed_shared_and_freed(llmos_run, default_gguf_path, tmp_path):
    env = {"LLMOS_HOME": str(tmp_path / "home")}
    assert llmos_run("add", default_gguf_path, "--name", "m", env=env).returncode == 0
    stored = next((tmp_path / "home" / "models" / "m").glob("*.gguf"))
    first = llmos_run("generate", "Hi", "-n", "1", "-t", "0", "--model", "m", env=env)
    assert first.returncode == 0, first.stderr
    assert "first load of" in first.stderr and "measuring weight forms of" in first.stderr
    assert "1/" in first.stderr  # a counted progress bar, though stderr is not a terminal

    other = tmp_path / "elsewhere.gguf"  # another path to the same bytes: no new measurement, no new copy
    os.link(stored, other)
    again = llmos_run("generate", "Hi", "-n", "1", "-t", "0", "--model", str(other), env=env)
    assert again.returncode == 0 and again.stderr == ""
    converted = list((tmp_path / "home" / "converted").glob("*.safetensors"))
    assert len(converted) == 1

    listed = llmos_run("list", env=env).stdout
    key = converted[0].name.split("-")[0]
    row = next(line for line in listed.splitlines() if line.startswith(key))
    assert "MB" in row and str(stored) in row and str(other) in row

    # a model keeps one converted copy: the form loaded last
    assert llmos_run("generate", "Hi", "-n", "1", "--dtype", "int8", "--model", "m", env=env).returncode == 0
    converted = list((tmp_path / "home" / "converted").glob("*.safetensors"))
    assert [p.name.split("-")[1] for p in converted] == ["int8.safetensors"]

    stale = tmp_path / "home" / "converted" / ("0" * 24 + "-int8.safetensors")  # e.g. from a path-keyed version
    stale.write_bytes(bytes(1000))
    pruned = llmos_run("prune", env=env)
    assert pruned.stdout == "freed 1.0 kB\n" and not stale.exists() and converted[0].exists()

    removed = llmos_run("rm", "m", env=env)
    assert removed.returncode == 0 and removed.stdout.startswith("removed m and ") and "MB of converted copies" in removed.stdout
    assert not list((tmp_path / "home" / "converted").iterdir()) and not list((tmp_path / "home" / "quality").iterdir())

