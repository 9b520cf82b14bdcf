"""A job killed with SIGKILL after a checkpoint, mid-job, and finished by ``ammd run --resume``.

The job runs on a stream with no sampling in it (the training file's own responses scored by
the teacher, ``rollout.off_policy=dataset``), so the uninterrupted run is reproducible and the
resumed run must match it exactly: the same loss and gradient norm at every step after the
resume point, the same final score. Anything the checkpoint forgot (optimiser moments, the
scheduler, the prompt stream's position, the buffer's rows or use counts) breaks the equality.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.tb_events import read_scalars

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
AMMD = str(Path(sys.executable).with_name("ammd"))


def job_args(tmp_path, name):
    return [AMMD, "run", "configs/local-cpu.yaml", f"name={name}", f"output_dir={tmp_path}",
            "learner.steps=12", "learner.sync_every=4", "learner.save_every=4", "status.port=0",
            "data.eval_size=50", "eval.every=0", "rollout.off_policy=dataset",
            "buffer.on_policy_fraction=0", "rollout.prompts_per_batch=32"]


def run(args, log):
    with open(log, "w") as out:
        return subprocess.run(args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=600).returncode


def test_killed_job_resumes_and_matches_the_uninterrupted_run(toy_world, tmp_path):
    assert run(job_args(tmp_path, "full"), tmp_path / "full.log") == 0, (tmp_path / "full.log").read_text()[-3000:]
    full = json.loads((tmp_path / "full" / "report.json").read_text())

    latest = tmp_path / "cut" / "checkpoints" / "latest"
    with open(tmp_path / "cut.log", "w") as out:
        proc = subprocess.Popen(job_args(tmp_path, "cut"), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.time() + 420
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert latest.exists(), (tmp_path / "cut.log").read_text()[-3000:]
    os.kill(proc.pid, signal.SIGKILL)  # the driver, mid-job, after its first checkpoint
    proc.wait()
    cut_log = (tmp_path / "cut.log").read_text()
    done = max(int(l.split("step ")[1].split("/")[0]) for l in cut_log.splitlines() if "/12 loss" in l)
    assert done < 12 and not (tmp_path / "cut" / "report.json").exists()

    # Resuming something else is refused, naming what differs.
    bad = subprocess.run(job_args(tmp_path, "cut") + ["learner.lr=0.01", "--resume"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "learner.lr: checkpoint 0.001, now 0.01" in bad.stderr

    assert run(job_args(tmp_path, "cut") + ["--resume"], tmp_path / "resume.log") == 0, \
        (tmp_path / "resume.log").read_text()[-3000:]
    resume_log = (tmp_path / "resume.log").read_text()
    start = int(resume_log.split("(step ")[1].split(" of")[0])
    assert done - start <= 4  # at most save_every steps are redone
    resumed = json.loads((tmp_path / "cut" / "report.json").read_text())
    assert resumed["steps"] == 12 and resumed["final_weight_version"] == full["final_weight_version"]
    assert [h["step"] for h in resumed["history"]] == list(range(1, 13))
    for a, b in zip(full["history"], resumed["history"]):
        assert (a["step"], a["loss"], a["grad_norm"], a["lr"]) == (b["step"], b["loss"], b["grad_norm"], b["lr"])
    assert resumed["student_score_after"] == full["student_score_after"]
    assert resumed["rollout_usage"] == full["rollout_usage"]  # no row made twice, none lost
    # TensorBoard shows every step once: the checkpoint's, then the resumed run's.
    tb = read_scalars(tmp_path / "cut" / "tb")
    for key in ("loss", "grad_norm", "lr"):
        assert tb[f"train/{key}"] == {h["step"]: h[key] for h in resumed["history"]}, key


def test_a_dead_learner_rank_fails_the_job_with_the_resume_command(toy_world, tmp_path):
    """Kill learner rank 1's process after the first checkpoint: the job stops with one line
    that names the learner and the command that resumes it, and the checkpoint stays usable."""
    import urllib.request

    from cluster import checkpoint
    from learner.learner_actor import free_port

    port = free_port()
    args = job_args(tmp_path, "rank") + [f"status.port={port}", "learner.steps=40"]
    with open(tmp_path / "rank.log", "w") as out, open(tmp_path / "rank.err", "w") as errors:
        proc = subprocess.Popen(args, cwd=ROOT, stdout=out, stderr=errors)
    latest = tmp_path / "rank" / "checkpoints" / "latest"
    pid, deadline = None, time.time() + 420
    while pid is None and proc.poll() is None and time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=2) as r:
                snap = json.loads(r.read())
            if latest.exists():
                pid = snap["actors"]["learner-1"].get("pid")
        except OSError:
            pass
        time.sleep(0.2)
    assert pid, "learner-1 never reported its pid after a checkpoint"
    os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=300)
    err = (tmp_path / "rank.err").read_text()
    lines = [l for l in err.strip().splitlines() if l.startswith("ammd: error:")]
    assert proc.returncode == 1 and len(lines) == 1, err[-3000:]
    assert "learner" in lines[0] and "--resume" in lines[0] and "name=rank" in lines[0]
    kept = checkpoint.latest(tmp_path / "rank" / "checkpoints")
    assert kept is not None and (kept / "student" / "config.json").is_file()
    assert checkpoint.load_state(kept)["trainer"]["step"] % 4 == 0
