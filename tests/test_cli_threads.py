"""The CLI picks its thread count from the cores other work leaves idle."""

from __future__ import annotations

import os

import pytest

from llmos.cli import main as cli


def test_auto_threads_leaves_busy_cores_alone(monkeypatch):
    from llmos import threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    for busy, want in ((0.1, 4), (1.2, 3), (9.0, 1)):  # never fewer than one
        monkeypatch.setattr(threads, "others_busy", lambda busy=busy: busy)
        assert cli.auto_threads() == want


def test_without_proc_the_load_average_says(monkeypatch):
    from llmos import threads

    monkeypatch.setattr(threads, "_machine_busy_seconds", lambda: None)
    monkeypatch.setattr(threads, "_runnable_others", lambda: None)
    monkeypatch.setattr(threads, "_last", None)
    monkeypatch.setattr(threads, "_measured", None)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.2, 0.0, 0.0))
    assert threads.others_busy() == 1.2


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

    code = ("import os, sys, llmos, torch, llmos.threads\n"
            "for load, given in ((99.0, None), (0.0, None), (99.0, 3)):\n"
            "    llmos.threads.others_busy = lambda: load\n"
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


def _policy(prelude: str, **extra: str) -> str:
    """What OpenMP will read in a new process after `prelude` (which imports llmos one way or another)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    show = "import os; print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))"
    out = subprocess.run([sys.executable, "-c", prelude + show], capture_output=True, text=True,
                         env={**env, **extra}, timeout=60, check=True)
    return out.stdout.strip()


def test_openmp_workers_spin_a_bounded_while_on_an_idle_machine_and_sleep_on_a_busy_one():
    """Measured (llmos/threads.py): 2 spinning threads ~170 tok/s idle, ~25-40 beside a busy process;
    2 sleeping ones ~80 either way; 1 thread ~110 either way."""
    from llmos import threads

    assert threads.wait_policy(2, 2) == {"GOMP_SPINCOUNT": str(threads.SPIN)}
    assert threads.wait_policy(1, 2) == {"OMP_WAIT_POLICY": "passive"}
    assert threads.wait_policy(3, 4) == {"OMP_WAIT_POLICY": "passive"}
    # A process computing on every core the test may use: llmos sees it at import and waits passively.
    import subprocess
    import sys

    hogs = [subprocess.Popen([sys.executable, "-c", "print('busy', flush=True)\nwhile True: pass"], stdout=subprocess.PIPE)
            for _ in os.sched_getaffinity(0)]
    try:
        assert all(hog.stdout.readline() == b"busy\n" for hog in hogs)  # each is in its loop now
        assert _policy("import llmos; ") == "passive None"
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def test_the_users_openmp_settings_stand_and_a_loaded_torch_is_left_alone():
    assert _policy("import llmos; ", OMP_WAIT_POLICY="active") == "active None"
    assert _policy("import llmos; ", GOMP_SPINCOUNT="5") == "None 5"
    # torch loaded first has read the environment already: llmos does not pretend to change it.
    assert _policy("import torch, llmos; ") == "None None"


def test_other_work_is_measured_without_this_processs_own(monkeypatch):
    """Cores busy over an interval (/proc/stat) less this process's CPU time over it; a short interval
    keeps the last measurement; before any, the runnable threads of other processes."""
    from llmos import threads

    clock = {"wall": 100.0, "busy": 50.0, "own": 3.0}
    monkeypatch.setattr(threads.time, "monotonic", lambda: clock["wall"])
    monkeypatch.setattr(threads, "_machine_busy_seconds", lambda: clock["busy"])
    monkeypatch.setattr(threads, "_own_seconds", lambda: clock["own"])
    monkeypatch.setattr(threads, "_runnable_others", lambda: 1.0)
    monkeypatch.setattr(threads, "_cores", lambda: 2)
    monkeypatch.setattr(threads, "_last", None)
    monkeypatch.setattr(threads, "_measured", None)
    assert threads.others_busy() == 1.0 and threads.auto_threads() == 1  # no history yet: runnable now
    clock.update(wall=101.0, busy=51.9, own=4.8)  # 1.9 core-seconds busy, 1.8 of them this process's
    assert threads.others_busy() == pytest.approx(0.1) and threads.auto_threads() == 2
    clock.update(wall=101.1, busy=52.1, own=4.8)  # too short to measure: the last measurement
    assert threads.others_busy() == pytest.approx(0.1)
    clock.update(wall=102.0, busy=53.9, own=4.9)  # from 101.0: 2.0 core-seconds busy, 0.1 own
    assert threads.others_busy() == pytest.approx(1.9) and threads.auto_threads() == 1


def test_a_busy_process_is_seen_within_a_second():
    import subprocess
    import sys
    import time

    from llmos import threads

    threads.sample()
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.6)
        assert threads.others_busy() >= 0.6
    finally:
        hog.kill()
        hog.wait()
