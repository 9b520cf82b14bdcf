"""The two checking services of docker-compose.multinode.yml (run inside the ammd image).

``submit``: wait until the head sees its two worker nodes, ``ray job submit`` the demo config with
the learner ranks asking for ``learner_node`` and the rollout actors for ``rollout_node``, follow
its logs, then check runs/<name>/report.json: the job succeeded, trained every step with finite
losses, and its placement puts the learner ranks on the ray-learner container and the rollout
actors on the ray-rollout container. Exit 0 only if all of that holds.

``probe``: poll the job's ``/status`` on the head (the driver runs there under ``ray job submit``)
until a training step and the placement show, and check the placement the same way.

Environment: DASHBOARD_URL, AMMD_STEPS, AMMD_EVAL_SIZE (submit), JOB_URL (probe), TIMEOUT_S;
AMMD_APP_DIR (/app) and AMMD_NODE_HOSTS ("ray-learner ray-rollout") for a run outside compose.
"""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

NAME = "multinode"
APP = Path(os.environ.get("AMMD_APP_DIR", "/app"))
REPORT = APP / "runs" / NAME / "report.json"
HOSTS = dict(zip(("learner", "rollout"), os.environ.get("AMMD_NODE_HOSTS", "ray-learner ray-rollout").split()))


def log(msg: str) -> None:
    print(f"[{sys.argv[1]} {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def check_placement(placement: dict[str, dict[str, str]]) -> list[str]:
    """Problems with ``{actor: {"node_id", "node_ip"}}``: learner ranks must run on the ray-learner
    container, student/teacher actors on ray-rollout (matched by IP), never a node in common."""
    ips = {kind: socket.gethostbyname(host) for kind, host in HOSTS.items()}
    learners = {n: p for n, p in placement.items() if n.startswith("learner-")}
    rollouts = {n: p for n, p in placement.items() if n.startswith(("student-", "teacher-"))}
    problems = [f"{n} runs on {p['node_ip']}, not {HOSTS['learner']} ({ips['learner']})"
                for n, p in learners.items() if p["node_ip"] != ips["learner"]]
    problems += [f"{n} runs on {p['node_ip']}, not {HOSTS['rollout']} ({ips['rollout']})"
                 for n, p in rollouts.items() if p["node_ip"] != ips["rollout"]]
    shared = {p["node_id"] for p in learners.values()} & {p["node_id"] for p in rollouts.values()}
    if shared or not learners or not rollouts:
        problems.append(f"learner ranks and rollout actors share nodes {sorted(shared)} or one kind is missing")
    return problems


def wait_for_nodes(url: str, count: int, deadline: float) -> None:
    from ray.util.state import list_nodes
    while time.time() < deadline:
        try:
            alive = list_nodes(address=url, filters=[("state", "=", "ALIVE")])
            if len(alive) >= count:
                log(f"{len(alive)} nodes alive: " + ", ".join(f"{n.node_ip} {n.resources_total}" for n in alive))
                return
        except Exception as err:  # the dashboard's state API is not up yet
            log(f"waiting for the cluster: {type(err).__name__}")
        time.sleep(3)
    sys.exit(f"fewer than {count} Ray nodes alive in time")


def job_command() -> list[str]:
    return ["ammd", "run", f"{APP}/configs/local-cpu.yaml", f"name={NAME}", f"output_dir={APP}/runs",
            f"models.toy_root={APP}/artifacts/toy", f"learner.steps={os.environ.get('AMMD_STEPS', '20')}",
            f"data.eval_size={os.environ.get('AMMD_EVAL_SIZE', '64')}", "status.host=0.0.0.0", "status.port=8000",
            "learner.resources={learner_node: 1}", "rollout.student.resources={rollout_node: 1}",
            "rollout.teacher.resources={rollout_node: 1}"]


def submit_job(url: str, deadline: float) -> str:
    """``ray job submit --no-wait``, again while the head's job agent is not registered yet."""
    job_id = f"ammd-{NAME}-{int(time.time())}"
    cmd = ["ray", "job", "submit", f"--address={url}", f"--submission-id={job_id}", "--no-wait", "--", *job_command()]
    while True:
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode == 0:
            log(f"submitted {job_id}: {' '.join(job_command())}")
            return job_id
        if "No available agent" not in out.stdout + out.stderr or time.time() > deadline:
            sys.exit(f"ray job submit failed:\n{(out.stdout + out.stderr)[-3000:]}")
        time.sleep(3)


def check_report(steps: int) -> list[str]:
    report = json.loads(REPORT.read_text())
    problems = check_placement(report.get("placement") or {})
    if report["steps"] != steps:
        problems.append(f"report.json: {report['steps']} steps, not {steps}")
    if not all(math.isfinite(h["loss"]) for h in report["history"]):
        problems.append("report.json: a loss is not finite")
    log(f"report: {report['steps']} steps, last loss {report['history'][-1]['loss']:.4f}, "
        f"student {report['student_score_before']:.3f} -> {report['student_score_after']:.3f}, "
        f"placement {json.dumps(report['placement'])}")
    return problems


def submit() -> None:
    url, deadline = os.environ["DASHBOARD_URL"], time.time() + float(os.environ["TIMEOUT_S"])
    wait_for_nodes(url, 3, deadline)
    REPORT.unlink(missing_ok=True)  # the volume keeps an earlier run's
    job_id = submit_job(url, deadline)
    subprocess.run(["ray", "job", "logs", f"--address={url}", "--follow", job_id],
                   timeout=max(1.0, deadline - time.time()))
    from ray.job_submission import JobStatus, JobSubmissionClient
    status = JobSubmissionClient(url).get_job_status(job_id)
    if status != JobStatus.SUCCEEDED:
        sys.exit(f"the job ended {status}")
    problems = check_report(int(os.environ.get("AMMD_STEPS", "20")))
    if problems:
        sys.exit("submit: " + "; ".join(problems))
    log("OK: the job succeeded; learner ranks and rollout actors ran on their own nodes")


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)


def probe() -> None:
    url, deadline = os.environ["JOB_URL"], time.time() + float(os.environ["TIMEOUT_S"])
    t0 = time.time()
    while time.time() < deadline:
        try:
            s = get(url + "/status")
        except OSError:  # not up yet: the job is still being submitted or starting
            time.sleep(2)
            continue
        if s["state"] == "failed":
            sys.exit(f"probe: the job failed: {s.get('error')}")
        if s["step"] >= 1 and s.get("placement"):
            problems = check_placement(s["placement"])
            if problems:
                sys.exit("probe: " + "; ".join(problems))
            log(f"/status step {s['step']}/{s['total_steps']}, losses {s['losses']}, after {time.time() - t0:.0f} s; "
                f"placement {json.dumps(s['placement'])}")
            log("OK: /status reachable on the head; learner ranks and rollout actors on different nodes")
            return
        time.sleep(1)
    sys.exit(f"probe: no step >= 1 with a placement in /status within {os.environ['TIMEOUT_S']} s")


if __name__ == "__main__":
    {"submit": submit, "probe": probe}[sys.argv[1]]()
