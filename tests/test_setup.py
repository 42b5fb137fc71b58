"""The set-up a new user runs: `make test` installs the system packages the suite needs itself."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "system-deps.sh"


def run_script(tmp_path: Path, uid: int, *args: str) -> subprocess.CompletedProcess:
    """The script with chromium missing, `id -u` answering `uid`, and an apt-get that logs its calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "id").write_text(f"#!/bin/sh\necho {uid}\n")
    (bin_dir / "apt-get").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/apt.log\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "LLMOS_CHROMIUM": str(tmp_path / "no-chromium")}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=60)


def test_system_deps_installs_missing_packages_as_root(tmp_path):
    out = run_script(tmp_path, 0)
    assert out.returncode == 0, out.stderr
    calls = (tmp_path / "apt.log").read_text().splitlines()
    assert calls[0] == "update -qq"
    assert calls[1].startswith("install -y") and calls[1].split()[-1] == "chromium"


def test_system_deps_names_the_packages_when_not_root(tmp_path):
    out = run_script(tmp_path, 1000)
    assert out.returncode == 1
    assert "chromium" in out.stderr and "sudo apt-get install -y chromium" in out.stderr
    assert not (tmp_path / "apt.log").exists()


def test_make_test_and_ci_run_both_install_system_deps():
    plan = subprocess.run(["make", "-n", "test"], cwd=ROOT, capture_output=True, text=True, timeout=60).stdout
    lines = plan.splitlines()
    deps = next(i for i, line in enumerate(lines) if "scripts/system-deps.sh" in line)
    tests = next(i for i, line in enumerate(lines) if "pytest" in line)
    assert deps < tests
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci


def test_every_readme_verb_works_after_a_plain_install():
    """serve, PDFs in index add/summarize, ANN search and eval summarize|translate import these
    lazily; they are base dependencies, so none stops with "pip install 'llmos[...]'"."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = {re.split(r"[<>=\[ ]", d)[0].lower() for d in project["dependencies"]}
    needed = {"pypdf", "usearch", "rouge-score", "sacrebleu", "langdetect", "starlette", "uvicorn", "pydantic", "jsonschema"}
    assert needed <= base, needed - base
    assert "torch==2.13.0" in project["dependencies"]
    # the README's OpenAI-client example: `make run` installs the `all` extra
    assert any(d.startswith("openai") for d in project["optional-dependencies"]["all"])
    assert '-e ".[all]"' in (ROOT / "Makefile").read_text()
    for source in (ROOT / "llmos").rglob("*.py"):
        assert not re.search(r"llmos\[(search|text|serve|train)\]", source.read_text()), source


def readme_commands() -> list[str]:
    """The `llmos ...` lines of the README's sh blocks, without their comments."""
    import shlex

    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)```", text, flags=re.S)
    lines = []
    for block in blocks:
        for line in block.splitlines():
            code = line.split("  #")[0].split(" # ")[0].strip()
            words = shlex.split(code, comments=False) if code else []
            if "llmos" in words:
                lines.append(code)
    return lines


def test_readme_commands_are_one_command_a_line_and_parse():
    import shlex

    from llmos.cli.main import build_parser

    commands = readme_commands()
    assert len(commands) > 30
    parser = build_parser()
    for code in commands:
        assert "|" not in code, f"'|' used to mean 'or': {code}"
        words = shlex.split(code)
        words = words[words.index("llmos") + 1:]
        words = words[: next((i for i, w in enumerate(words) if w in ("<", ">")), len(words))]
        try:
            parser.parse_args(words)
        except SystemExit as exc:
            assert exc.code == 0, f"does not parse: {code}"


def test_readme_says_how_to_put_llmos_on_path_right_after_the_set_up():
    head = (ROOT / "README.md").read_text().split("## ")[0]
    assert ". .venv/bin/activate" in head.split("make test")[1]


def test_llmos_version(llmos_run):
    from llmos import __version__

    assert llmos_run("--version").stdout == f"llmos {__version__}\n"


def test_every_file_the_package_reads_is_package_data():
    """A non-editable install carries only what package-data names: every data file and C++ source
    under llmos/ must match one of its patterns (quality.txt and the kernels' sources once did not)."""
    import fnmatch
    import tomllib

    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["llmos"]
    package = root / "llmos"
    files = [p.relative_to(package).as_posix() for p in package.rglob("*")
             if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts]
    assert files
    missing = [f for f in files if not any(fnmatch.fnmatch(f, pat) for pat in patterns)]
    assert not missing, f"add to [tool.setuptools.package-data] in pyproject.toml: {missing}"
