"""The quality benchmark's reduced variant: one task, one seed, a few steps, every method.

It runs the real harness (``python -m bench.quality``) so the sweep cannot rot: every method
must go through the users' job on shared rollout actors, train on the rows it claims, start
from the same initial student, and land in the tables and curves.
"""
import json
import math
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from bench.quality import METHODS, ROWS_SOURCES

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
STEPS = 3


def test_every_method_runs_through_the_job(toy_world, tmp_path):
    # Every label spelled out (they hold spaces and "="), then an override after them.
    args = ["--tasks", "sort", "--seeds", "0", "--steps", str(STEPS), "--out", str(tmp_path),
            "--methods", *METHODS, "data.eval_size=60"]
    cmd = [sys.executable, "-m", "bench.quality", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads((tmp_path / "quality.json").read_text())
    assert shlex.split(result["command"])[3:] == args  # the recorded command re-runs as given
    runs = {r["method"]: r for r in result["runs"]}
    assert set(runs) == set(METHODS) and len(result["runs"]) == len(METHODS)
    for method, r in runs.items():
        assert r["steps"] == STEPS, method
        assert all(0.0 <= r[k] <= 1.0 and math.isfinite(r[k]) for k in ("test", "val")), method
        # Each method trained only on the rows it claims (SFT on the file, GKD on the student's...).
        used = {s for s, n in r["rows_by_source"].items() if n > 0}
        assert used == ROWS_SOURCES[r["rows"]], (method, r["rows_by_source"])
        assert len(r["curves"]) == STEPS and all(math.isfinite(h["loss"]) for h in r["curves"])
    # The shared student engine is reset before every job: all start from the same student.
    assert len({r["student_before"] for r in runs.values()}) == 1
    assert len({r["teacher"] for r in runs.values()}) == 1
    assert all("adversary_loss" in h and "d_on" in h for h in runs["AMM (beta=0.5)"]["curves"])
    text = (tmp_path / "quality.md").read_text()
    assert "#### sort" in text and "AMM, best beta on validation" in text and "**" in text
    assert (tmp_path / "quality_curves.png").stat().st_size > 10_000
