"""The quality benchmark's reduced variant: one task, a few steps, through the real harness.

It runs ``python -m bench.quality`` so the sweep cannot rot: every default method, TRL's
trainers included, must go through its real path (the users' job on shared rollout actors, or
TRL in its own venv scored by the same student engine), train on the rows it claims, start
from the same initial student, and land in the tables; and the learning-rate search must pick
a rate on the first seed and run the next seed at it.
"""
import json
import math
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from bench.quality import DEFAULT_METHODS, ROWS_SOURCES
from bench.trl_runner import TRL_METHODS

pytestmark = [pytest.mark.slow, pytest.mark.extended]  # ~8 min: CI runs it (make test-extended)
ROOT = Path(__file__).resolve().parents[2]
STEPS = 3
ABLATION = "AMM chi2 oracle (beta=0.5)"  # one first-seed ablation, through the same path


def bench(args: list[str], out: Path) -> dict:
    proc = subprocess.run([sys.executable, "-m", "bench.quality", *args, "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return json.loads((out / "quality.json").read_text())


def test_every_default_method_runs_through_its_real_path(toy_world, tmp_path):
    # Every label spelled out (they hold spaces, commas and "="), then an override after them.
    args = ["--tasks", "sort", "--seeds", "0", "--steps", str(STEPS), "--lrs", "1e-3",
            "--methods", *DEFAULT_METHODS, "--ablations", ABLATION, "data.eval_size=60"]
    result = bench(args, tmp_path)
    assert shlex.split(result["command"])[3:] == args + ["--out", str(tmp_path)]  # re-runs as given
    runs = {r["method"]: r for r in result["runs"] if not r.get("ablation")}
    assert set(runs) == set(DEFAULT_METHODS) and len(result["runs"]) == len(DEFAULT_METHODS) + 1
    ablation = next(r for r in result["runs"] if r.get("ablation"))
    assert ablation["method"] == ABLATION and ablation["lr"] == 1e-3 and len(ablation["curves"]) == STEPS
    for method, r in runs.items():
        assert r["steps"] == STEPS and r["lr"] == 1e-3 and r["selected"], method
        assert all(0.0 <= r[k] <= 1.0 and math.isfinite(r[k]) for k in ("test", "val")), method
        if method in TRL_METHODS:
            continue
        # Each method trained only on the rows it claims (SFT on the file, GKD on the student's...).
        used = {s for s, n in r["rows_by_source"].items() if n > 0}
        assert used == ROWS_SOURCES[r["rows"]], (method, r["rows_by_source"])
        assert len(r["curves"]) == STEPS and all(math.isfinite(h["loss"]) for h in r["curves"])
        assert all(u["ratio"] <= 1.2 for u in r["rollout_usage"].values()), (method, r["rollout_usage"])
    # Every student, TRL's too, starts from the same initial student and is scored the same way.
    assert len({r["student_before"] for r in runs.values()}) == 1
    assert len({r["teacher"] for r in runs.values()}) == 1
    assert all("adversary_loss" in h and "d_on" in h for h in runs["AMM (beta=0.5)"]["curves"])
    text = (tmp_path / "quality.md").read_text()
    assert "#### sort" in text and "ammd against TRL" in text and "| TRL SFTTrainer |" in text
    assert f"| {ABLATION} (ablation) |" in text


def test_learning_rate_is_searched_on_the_first_seed_only(toy_world, tmp_path):
    # One ammd method: TRL's runs go through the same search (bench.quality.pick_lrs), and
    # every TRL job costs a process of its own (~25 s); the test above runs TRL's path.
    methods = ["FKL", "SFT"]
    result = bench(["--tasks", "sort", "--seeds", "0", "1", "--steps", str(STEPS),
                    "--lrs", "1e-3", "3e-3", "--methods", *methods, "data.eval_size=40"], tmp_path)
    first = [r for r in result["runs"] if r["seed"] == 0]
    second = [r for r in result["runs"] if r["seed"] == 1]
    assert sorted((r["method"], r["lr"]) for r in first) == sorted((m, lr) for m in methods for lr in (1e-3, 3e-3))
    for m in methods:
        picked = max(sorted((r for r in first if r["method"] == m), key=lambda r: r["lr"]), key=lambda r: r["val"])
        assert [r["lr"] for r in second if r["method"] == m] == [picked["lr"]]
        assert [r["selected"] for r in first if r["method"] == m] == [r is picked for r in first if r["method"] == m]
    assert "Learning-rate search" in (tmp_path / "quality.md").read_text()
