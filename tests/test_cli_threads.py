"""The CLI picks its thread count from the cores other work leaves idle."""

from __future__ import annotations

import os

from llmos.cli import main as cli


def test_auto_threads_leaves_busy_cores_alone(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.0, 0.0))
    assert cli.auto_threads() == 4
    monkeypatch.setattr(os, "getloadavg", lambda: (1.2, 0.0, 0.0))
    assert cli.auto_threads() == 3
    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 0.0, 0.0))
    assert cli.auto_threads() == 1  # never fewer than one


def test_cli_sets_threads_before_torch_loads():
    import subprocess
    import sys

    code = ("import sys; from llmos.cli.main import main; import os;"
            "sys.argv=['llmos']; main(['list']); print('OMP', os.environ['OMP_NUM_THREADS'])")
    env = {**os.environ}
    env.pop("OMP_NUM_THREADS", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0 and "OMP " in out.stdout
    assert 1 <= int(out.stdout.split("OMP ")[1]) <= (os.cpu_count() or 1)


def test_the_python_api_picks_threads_as_the_cli_does(default_gguf_path):
    """llmos.load without OMP_NUM_THREADS: the busy cores are left alone (2 threads beside a busy
    neighbour ran questions 10-27x slower than 1); an explicit `threads=` wins."""
    import subprocess
    import sys

    code = ("import os, sys, llmos, torch\n"
            "for load, given in ((99.0, None), (0.0, None), (99.0, 3)):\n"
            "    os.getloadavg = lambda: (load, 0.0, 0.0)\n"
            "    torch.set_num_threads(7)\n"
            "    llmos.load(sys.argv[1], dtype='fp32', threads=given)\n"
            "    print(torch.get_num_threads())")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", code, default_gguf_path], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", str(len(os.sched_getaffinity(0))), "3"]


def test_the_api_refuses_zero_threads(default_gguf_path):
    import pytest

    import llmos

    with pytest.raises(llmos.LlmosError, match="threads"):
        llmos.load(default_gguf_path, threads=0)


def test_import_llmos_makes_openmp_wait_passively_unless_told_or_too_late():
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    show = "import os; print(os.environ.get('OMP_WAIT_POLICY'))"

    def policy(prelude: str, **extra: str) -> str:
        out = subprocess.run([sys.executable, "-c", prelude + show], capture_output=True, text=True,
                             env={**env, **extra}, timeout=60, check=True)
        return out.stdout.strip()

    assert policy("import llmos; ") == "passive"
    assert policy("import llmos; ", OMP_WAIT_POLICY="active") == "active"  # the user's choice stands
    # torch loaded first has read the environment already: llmos does not pretend to change it.
    assert policy("import torch, llmos; ") == "None"
