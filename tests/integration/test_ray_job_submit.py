"""The demo config submitted to a running Ray cluster with ``ray job submit``, as users do.

The head runs with ``--block`` in its own session so the test can stop exactly this cluster
(``ray stop`` would stop every Ray on the machine, including other tests' clusters), and on
free ports throughout: the agents' fixed default ports are taken when another Ray (the
session's embedded cluster) runs on the same machine, and its job agent then never registers.
Token auth is disabled on this throwaway head (PLATFORM.md): nothing is written to $HOME.
"""
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from learner.learner_actor import free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def wait_for_job(url: str, job_id: str, timeout: float) -> tuple[str, str]:
    """Poll the job's status through Ray's job SDK until it ends: (final status, its logs)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # as on the throwaway head (no token anywhere)
    client, deadline = JobSubmissionClient(url), time.time() + timeout
    while time.time() < deadline:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return str(status.value), client.get_job_logs(job_id)
        time.sleep(3)
    raise AssertionError(f"job {job_id} did not end within {timeout:.0f} s: {client.get_job_logs(job_id)[-3000:]}")


def wait_for_dashboard(url: str, head: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert head.poll() is None, "ray start --head exited early"
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"the Ray dashboard at {url} did not come up")


def test_demo_config_runs_under_ray_job_submit(toy_world, tmp_path):
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    temp_dir = tempfile.mkdtemp(prefix="rayhead_", dir="/tmp")  # short: socket paths have a limit
    dash = free_port()
    head = subprocess.Popen(
        [str(bin_dir / "ray"), "start", "--head", "--block", f"--port={free_port()}",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
         f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
         "--num-cpus=6", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{dash}"
    try:
        wait_for_dashboard(url, head)
        out = tmp_path / "runs"
        # --no-wait, then polling the status: tailing the logs over the dashboard's websocket
        # broke off once on a loaded machine (close code 1006) while the job itself was fine.
        submit = [str(bin_dir / "ray"), "job", "submit", f"--address={url}", f"--working-dir={ROOT}",
                  "--no-wait", "--submission-id", "submitted", "--", sys.executable, "-m", "cluster.cli", "run", "configs/local-cpu.yaml", "name=submitted",
                  f"models.toy_root={ROOT / 'artifacts' / 'toy'}", f"output_dir={out}", "learner.steps=6",
                  "learner.sync_every=2", "data.eval_size=20", "rollout.prompts_per_batch=32",
                  f"status.port={free_port()}"]
        deadline = time.time() + 180
        while True:
            job = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=600)
            # The dashboard answers before the head's job agent registers (seconds on a busy
            # machine); Ray asks to try again later.
            if "No available agent" not in job.stderr + job.stdout or time.time() > deadline:
                break
            time.sleep(3)
        assert job.returncode == 0, (job.stdout + job.stderr)[-4000:]
        status, logs = wait_for_job(url, "submitted", timeout=600)
        assert status == "SUCCEEDED", logs[-4000:]
        report = json.loads((out / "submitted" / "report.json").read_text())
        assert report["steps"] == 6 and report["final_weight_version"] == 3
        assert report["config"]["ray"]["address"] is None  # found through RAY_ADDRESS of the job
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
