"""benchmarks/gpu_check.sh: it parses, and a wrong option is a usage line (exit 2) before any
work. Its `--dry-run` runs every step at toy sizes on the CPU (~2 min on a loaded 2-core
machine, so not part of the suite); the figures themselves need a GPU."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def test_gpu_check_parses():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_gpu_check_rejects_an_unknown_option(tmp_path):
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--bogus"],
        capture_output=True,
        text=True,
        cwd=SCRIPT.parents[1],
        env={"OUT": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2 and "usage: bash benchmarks/gpu_check.sh" in proc.stderr
