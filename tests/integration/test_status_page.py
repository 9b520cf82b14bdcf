"""The live status page in a real browser: headless Chromium loads ``/`` and draws what ``/status`` holds.

Chromium comes from Debian (``make browser``, which ``make test-extended`` runs first). The page
writes what it drew into the DOM (see services/static/page.js): each chart's canvas carries
``data-series`` (points per series), the actors' table ``data-rows``; ``--dump-dom`` reads it
after the page's scripts ran, with no WebDriver or Playwright.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

from learner.learner_actor import free_port
from services.status import JobStatus, StatusServer
from tests.integration.test_job import get_json  # one HTTP JSON reader for the live-job tests

pytestmark = pytest.mark.extended  # CI runs it (make test-extended, after make browser)
ROOT = Path(__file__).resolve().parents[2]
CHARTS = ("chart-loss", "chart-optim", "chart-eval", "chart-throughput")


def chromium() -> str:
    """The browser's path; a missing browser fails the test (CI installs it), naming the fix."""
    found = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    if found is None:
        pytest.fail("headless Chromium is not installed: run `make browser` (apt-get install chromium)")
    return found


class Drawn(HTMLParser):
    """What the page drew: {chart id: {series: points}}, the actor rows, <body>'s data-*."""

    def __init__(self):
        super().__init__()
        self.charts: dict[str, dict[str, int]] = {}
        self.points: dict[str, int] = {}
        self.actors: list[str] = []
        self.rows: int | None = None
        self.body: dict[str, str] = {}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "canvas" and a.get("id") in CHARTS:
            self.charts[a["id"]] = json.loads(a.get("data-series") or "{}")
            self.points[a["id"]] = int(a["data-points"])
        elif tag == "table" and a.get("id") == "actors":
            self.rows = int(a["data-rows"])
        elif tag == "tr" and "data-actor" in a:
            self.actors.append(a["data-actor"])
        elif tag == "body":
            self.body = {k: v for k, v in a.items() if k.startswith("data-")}


def load_page(url: str, profile: Path, budget_ms: int = 5000) -> Drawn:
    """``url`` loaded in headless Chromium, its scripts run for ``budget_ms`` of virtual time."""
    # A profile of its own: two browsers on one profile refuse to start.
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", "--dump-dom", url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "<body" in out.stdout, out.stderr[-2000:]
    drawn = Drawn()
    drawn.feed(out.stdout)
    assert int(drawn.body.get("data-polls", 0)) >= 1, f"the page never drew a snapshot:\n{out.stdout[:3000]}"
    return drawn


def count(rows, key: str, x: str = "step") -> int:
    """Points a chart of ``key`` over ``x`` should hold: the rows where both are numbers."""
    number = (int, float)
    return sum(1 for r in rows or [] if isinstance(r.get(key), number) and isinstance(r.get(x), number))


def test_page_draws_an_older_snapshot_without_the_new_fields(tmp_path):
    """No throughput series, no per-actor tokens/s, no kind: the rest is drawn all the same."""
    status = JobStatus("old", total_steps=10)
    for step in (1, 2, 3):
        status.record_loss(step, {"loss": 1.0 / step, "lr": 1e-3, "grad_norm": 2.0})
    status.update(state="training", step=3, evals=[{"step": 2, "weight_version": 1, "score": 0.5}],
                  actors={"student-0": {"state": "alive", "last_seen_s": 0.5}, "buffer": {"state": "dead"}})
    server = StatusServer(status, "127.0.0.1", 0).start()
    try:
        drawn = load_page(server.url + "/", tmp_path / "profile")
    finally:
        server.stop()
    assert drawn.charts == {"chart-loss": {"loss": 3}, "chart-optim": {"lr": 3, "grad_norm": 3},
                            "chart-eval": {"score": 1}, "chart-throughput": {}}
    assert drawn.points == {"chart-loss": 3, "chart-optim": 6, "chart-eval": 1, "chart-throughput": 0}
    assert drawn.rows == 2 and drawn.actors == ["student-0", "buffer"]  # by kind: rollouts before the buffer
    assert drawn.body["data-step"] == "3"


@pytest.mark.slow
def test_page_draws_a_running_amm_job(toy_world, tmp_path):
    """A real AMM job: once it has trained a few steps and evaluated once, the page's charts
    hold at least the points /status held just before the page loaded (and at most those it
    held just after), and one table row per actor."""
    port = free_port()
    ammd = Path(sys.executable).with_name("ammd")
    cmd = [str(ammd), "run", "configs/local-cpu.yaml", "name=page", f"output_dir={tmp_path}",
           "learner.steps=200", "learner.sync_every=2", f"status.port={port}", "data.eval_size=20",
           "rollout.prompts_per_batch=32", "eval.every=2", "learner.save_every=0", "loss.name=amm"]
    log_path = tmp_path / "job.log"
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ}, stdout=log_path.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        before = wait_for(url, proc, log_path, lambda s: s["step"] >= 3 and s.get("evals"))
        drawn = load_page(url + "/", tmp_path / "profile")
        after = get_json(f"{url}/status")
        assert proc.poll() is None and after, "the job ended while the page loaded: make it longer"
    finally:
        stop(proc)
    check_drawn(drawn, before, after)


def wait_for(url: str, proc: subprocess.Popen, log_path: Path, ready, timeout_s: float = 420) -> dict:
    """The first /status snapshot for which ``ready(snapshot)`` holds, while the job runs."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        assert proc.poll() is None, f"the job ended early:\n{log_path.read_text()[-3000:]}"
        snap = get_json(f"{url}/status")
        if snap and ready(snap):
            return snap
        time.sleep(0.5)
    pytest.fail(f"the job never got ready within {timeout_s} s:\n{log_path.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    """Ctrl-C for the driver (it stops its actors and Ray), then SIGKILL if it hangs (the reaper
    then removes what it leaves)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def check_drawn(drawn: Drawn, before: dict, after: dict) -> None:
    expected = {
        "chart-loss": {k: count(before["history"], k) for k in ("loss", "d_on", "d_off", "adversary_loss")},
        "chart-optim": {k: count(before["history"], k) for k in ("lr", "grad_norm")},
        "chart-eval": {"score": count(before["evals"], "score")},
    }
    upper = {"chart-loss": after["history"], "chart-optim": after["history"], "chart-eval": after["evals"]}
    assert expected["chart-loss"]["loss"] >= 3 and expected["chart-loss"]["d_on"] >= 3  # AMM's curves exist
    assert expected["chart-eval"]["score"] >= 1
    for chart, series in expected.items():
        assert set(drawn.charts[chart]) <= set(series), (chart, drawn.charts[chart])
        for key, least in series.items():
            got, most = drawn.charts[chart].get(key, 0), count(upper[chart], key)
            assert least <= got <= most, (chart, key, least, got, most)
    # Throughput over time, when the driver publishes the series (older drivers do not).
    if before.get("throughput"):
        for key in ("learner_tokens_per_s", "rollout_tokens_per_s"):
            least, most = count(before["throughput"], key, "t"), count(after["throughput"], key, "t")
            assert least <= drawn.charts["chart-throughput"].get(key, 0) <= most, key
    assert drawn.rows == len(after["actors"]) == len(drawn.actors)
    assert set(drawn.actors) == set(after["actors"]) >= {"student-0", "teacher-0", "learner-0", "learner-1", "buffer"}
    assert before["step"] <= int(drawn.body["data-step"]) <= after["step"]
