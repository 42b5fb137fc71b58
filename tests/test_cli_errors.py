"""Bad input to the `llmos` command: one line naming the flag or variable, before any model loads."""

from __future__ import annotations

import socket

import pytest


def one_line_error(out, *names: str) -> str:
    assert out.returncode in (1, 2), out
    assert "Traceback" not in out.stderr and out.stderr.count("\n") == 1, out.stderr
    for name in names:
        assert name in out.stderr, out.stderr
    return out.stderr


@pytest.mark.parametrize("args, flag", [
    (["serve", "--port", "99999"], "--port"),
    (["serve", "--threads", "0"], "--threads"),
    (["generate", "Hi", "--threads", "0"], "--threads"),
    (["generate", "Hi", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["generate", "Hi", "-n", "many"], "--max-new-tokens"),
    (["bench", "--threads", "-1"], "--threads"),
])
def test_bad_numbers_are_refused_by_name(llmos_run, args, flag):
    one_line_error(llmos_run(*args, timeout=60), flag)


def test_serve_on_a_busy_port_fails_before_loading(llmos_run, default_gguf_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        err = one_line_error(llmos_run("serve", "--model", default_gguf_path, "--port", str(port), timeout=60), "--port")
    assert "in use" in err and "loading" not in err


def test_add_refuses_a_file_that_is_not_a_model(llmos_run, tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_text("not a model\n")
    err = one_line_error(llmos_run("add", str(fake), "--name", "fake", env={"LLMOS_HOME": str(tmp_path / "home")}))
    assert "not a GGUF model" in err and not (tmp_path / "home" / "models" / "fake").exists()


@pytest.mark.parametrize("where", ["file", "under-a-file", "proc"])
def test_a_bad_llmos_home_is_named(llmos_run, tmp_path, where):
    (tmp_path / "f").write_text("")
    home = {"file": tmp_path / "f", "under-a-file": tmp_path / "f" / "x", "proc": "/proc/llmos-home"}[where]
    one_line_error(llmos_run("list", env={"LLMOS_HOME": str(home)}), f"LLMOS_HOME={home}")
