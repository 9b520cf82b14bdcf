"""Chaos: one job, its driver SIGKILLed at three random points and resumed each time, each
kind of actor killed once (a teacher, a learner rank, the replay buffer) and the same student
rollout actor three times, and a buffer segment of a checkpoint corrupted before one resume.

The job must finish every step, each step once in its history; ``/healthz`` must answer 200
within 30 s of every restart; ``report.json`` must record every restart and resume of the
whole job (not only of its last process) and the rows lost with the corrupt segment. Real Ray,
vLLM and DeepSpeed throughout, so it takes minutes: marked extended (CI runs it).
"""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from learner.learner_actor import free_port
from tests.integration.test_job import get_json

pytestmark = [pytest.mark.slow, pytest.mark.extended]
ROOT = Path(__file__).resolve().parents[2]
AMMD = str(Path(sys.executable).with_name("ammd"))
STEPS = 48


class Job:
    """One job name run as successive processes (the first fresh, every later one --resume)."""

    def __init__(self, tmp_path: Path):
        self.tmp, self.port, self.runs = tmp_path, free_port(), 0
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self) -> None:
        args = [AMMD, "run", "configs/local-cpu.yaml", "name=chaos", f"output_dir={self.tmp}",
                f"learner.steps={STEPS}", "learner.sync_every=4", "learner.save_every=4",
                f"status.port={self.port}", "data.eval_size=20", "eval.every=0",
                "rollout.prompts_per_batch=16"] + (["--resume"] if self.runs else [])
        self.log = self.tmp / f"run{self.runs}.log"
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=self.log.open("w"), stderr=subprocess.STDOUT)
        self.runs += 1
        if self.runs > 1:  # a restarted driver: its /healthz answers 200 within 30 s
            self._healthy_within(30.0, f"the restart of the driver (run {self.runs})")

    def _healthy_within(self, seconds: float, what: str) -> None:
        deadline = time.time() + seconds
        while time.time() < deadline:
            health = get_json(f"{self.url}/healthz")
            if health and health.get("status") == "ok":
                return
            time.sleep(0.5)
        pytest.fail(f"/healthz not 200 within {seconds:.0f} s of {what}:\n{self.text()}")

    def text(self) -> str:
        return self.log.read_text()[-4000:]

    def snap(self, until, what: str, timeout: float = 400.0) -> dict:
        """Poll /status until ``until(snap)`` holds; fail naming ``what``."""
        deadline = time.time() + timeout
        while time.time() < deadline and self.proc.poll() is None:
            snap = get_json(f"{self.url}/status")
            if snap and until(snap):
                return snap
            time.sleep(0.3)
        pytest.fail(f"run {self.runs}: never saw {what} (rc {self.proc.poll()}):\n{self.text()}")

    def kill_actor(self, name: str) -> int:
        """SIGKILL actor ``name`` by the pid /status shows; returns it."""
        pid = self.snap(lambda s: s["actors"].get(name, {}).get("pid"), f"{name}'s pid")["actors"][name]["pid"]
        os.kill(pid, signal.SIGKILL)
        return pid

    def restarted(self, name: str, count: int) -> None:
        """Wait until this process has restarted ``name`` ``count`` times, then require
        /healthz 200 within 30 s."""
        self.snap(lambda s: s["actors"].get(name, {}).get("restarts", 0) >= count, f"{name} restart {count}")
        self._healthy_within(30.0, f"{name}'s restart {count}")

    def kill_driver_at(self, step: int) -> None:
        snap = self.snap(lambda s: s["step"] >= step and (self.tmp / "chaos" / "checkpoints" / "latest").exists(),
                         f"step {step}")
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        pids = [a["pid"] for a in snap["actors"].values() if a.get("pid")]
        deadline = time.time() + 30  # the reaper puts the orphaned actors down (cluster.reaper)
        while time.time() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.5)
        assert not any(_alive(p) for p in pids), "the killed driver's actors outlived it by 30 s"

    def failed(self) -> str:
        """Wait for a run that lost an actor it cannot replace; its one error line."""
        assert self.proc.wait(timeout=400) == 1, self.text()
        lines = [l for l in self.log.read_text().splitlines() if l.startswith("ammd: error:")]
        assert len(lines) == 1 and "--resume" in lines[0], self.text()
        return lines[0]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _corrupt_a_checkpoint_segment(run_dir: Path) -> str:
    ckpt = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    seg = sorted((ckpt / "buffer").glob("segment-*.arrow"))[-1]
    data = bytearray(seg.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: bit rot
    seg.chmod(0o600)
    seg.write_bytes(bytes(data))
    return seg.name


def test_a_job_survives_driver_kills_actor_kills_and_a_corrupt_segment(toy_world, tmp_path):
    rng = random.Random(21)
    cuts = sorted(rng.sample(range(6, STEPS - 6), 3))  # the driver's three random deaths
    job = Job(tmp_path)

    job.start()  # run 0: a teacher and the student die, then the driver
    job.snap(lambda s: s["step"] >= 1, "the first step")
    job.kill_actor("teacher-0")
    job.restarted("teacher-0", 1)
    job.kill_actor("student-0")
    job.restarted("student-0", 1)
    job.kill_driver_at(cuts[0])

    job.start()  # run 1: the same student twice more, then a learner rank
    job.snap(lambda s: s["state"] == "training", "training after the first resume")
    for n in (1, 2):
        job.kill_actor("student-0")
        job.restarted("student-0", n)
    job.kill_actor("learner-1")
    assert "learner" in job.failed()

    lost_segment = _corrupt_a_checkpoint_segment(tmp_path / "chaos")
    job.start()  # run 2: resumes over the corrupt segment, then the driver dies
    job.kill_driver_at(cuts[1])

    job.start()  # run 3: the buffer dies
    job.snap(lambda s: s["state"] == "training", "training after the third resume")
    job.kill_actor("buffer")
    job.failed()

    job.start()  # run 4: the driver's third death
    job.kill_driver_at(cuts[2])

    job.start()  # run 5: to the end
    assert job.proc.wait(timeout=600) == 0, job.text()
    report = json.loads((tmp_path / "chaos" / "report.json").read_text())
    assert report["steps"] == STEPS and [h["step"] for h in report["history"]] == list(range(1, STEPS + 1))
    assert report["restarts"] == {"teacher-0": 1, "student-0": 3}, report["restarts"]
    assert len(report["resumes"]) == 5 and len(report["failures"]) == 2, (report["resumes"], report["failures"])
    assert report["lost_rows"] > 0
    assert any(lost_segment in p and "sha256" in p for p in report["recovery_problems"]), report["recovery_problems"]
    assert "resumed from" in (tmp_path / "chaos" / "report.md").read_text()
    # Private to their owner: a checkpoint is code to whoever can write it.
    run_dir = tmp_path / "chaos"
    ckpt = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    assert run_dir.stat().st_mode & 0o777 == 0o700 and ckpt.stat().st_mode & 0o777 == 0o700
    assert {p.stat().st_mode & 0o777 for p in ckpt.rglob("*") if p.is_file()} == {0o600}
