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
