"""File fuzzing in `make test`: mutated GGUF files and safetensors folders either load into a working
model or are refused in one LlmosError line, each case within fuzz_files.CASE_SECONDS and under an
address-space cap (resource.setrlimit), in a child process so the cap binds it alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.mark.parametrize("kind, examples", [("gguf", 1500), ("safetensors", 1000)])
def test_mutated_model_files_load_or_are_refused_in_one_line(kind, examples):
    out = subprocess.run([sys.executable, str(HERE / "fuzz_files.py"), kind, str(examples)], cwd=HERE,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-6000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"file fuzzing, {kind}: {report['cases']} cases, {report['outcomes']}")
    assert report["cases"] >= examples * 0.9  # Hypothesis ran (nearly) all it was asked to
    assert any(k.endswith("refused") for k in report["outcomes"]) and any(k.endswith("loaded") for k in report["outcomes"])
