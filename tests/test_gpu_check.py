"""bench/gpu_check.sh: its quick CPU mode runs every code path and prints the one table."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quick_cpu_mode_prints_every_row_of_the_table():
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([str(ROOT / "bench" / "gpu_check.sh"), "--device", "cpu", "--quick"],
                         capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    table = res.stdout.split("| what | precision |", 1)[1]
    for precision in ("fp32", "bf16"):
        for batch in (1, 4):
            assert f"| {precision} | {batch} | " in table
    for model in ("mcl", "mmss", "sancl"):
        assert f"| {model} train step |" in table
    assert "failed" not in table
    assert "0 (batched vs single" in table  # batch 1 against itself: exactly zero


@pytest.mark.gpu
def test_cuda_mode_refuses_without_cuda_and_runs_with_it():
    res = subprocess.run([str(ROOT / "bench" / "gpu_check.sh"), "--budget", "60"], capture_output=True,
                         text=True, env={**os.environ, "PYTHON": sys.executable}, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "| rois R-101 C4" in res.stdout
