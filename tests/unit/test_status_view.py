"""``ammd status``: the terminal view of a job, against a real status server (uvicorn).

``render`` is checked on hand-built snapshots for what a user reads off it (progress, the best
evaluation, each actor's row, why a job is unhealthy), and ``ammd status`` end to end against
``StatusServer`` serving a ``JobStatus`` the test drives as the job's driver would.
"""
import json

import pytest

from cluster.cli import main
from cluster.status_view import render
from services.status import JobStatus, StatusServer


def amm_snapshot(now: float) -> dict:
    return {
        "name": "demo", "state": "training", "step": 30, "total_steps": 120, "weight_version": 7,
        "started_at": now - 125, "metric": "rouge_l",
        "learner_tokens_per_s": 1234.4, "rollout_tokens_per_s": 5678.9, "weight_push_seconds": 0.125,
        "losses": {"loss": 0.25, "d_on": 0.04, "d_off": 0.31, "adversary_loss": -0.2, "lr": 1e-3,
                   "grad_norm": 0.5},
        "evals": [{"step": 10, "score": 0.41}, {"step": 20, "score": 0.47}, {"step": 30, "score": 0.45}],
        "buffer": {"rows_by_source": {"student": 96, "teacher": 64}},
        "sampled_age": {"mean": 0.5, "max": 1},
        "actors": {"student-0": {"state": "alive", "last_seen_s": 0.3, "restarts": 1, "tokens_per_s": 800.0},
                   "teacher-0": {"state": "dead", "last_seen_s": 40.0, "restarts": 0},
                   "learner-0": {"state": "alive", "last_seen_s": 0.1}},
        "placement": {"student-0": {"node_ip": "10.0.0.2"}},
    }


def test_render_shows_progress_losses_best_eval_and_every_actor():
    now = 1_000_000.0
    text = render(amm_snapshot(now), {"status": "unhealthy", "reasons": ["teacher-0 is dead"]}, now=now)
    lines = text.splitlines()
    assert lines[0] == "job demo: training, step 30/120 (25%), weight version 7, running 2m05s"
    assert "learner 1234 tok/s" in text and "rollout 5679 tok/s" in text and "0.12 s" in text
    losses = next(l for l in lines if l.startswith("losses"))
    for term in ("loss 0.25", "d_on 0.04", "d_off 0.31", "adversary_loss -0.2"):
        assert term in losses
    assert "(lr 0.001, grad_norm 0.5)" in losses  # lr and grad norm apart from the loss terms
    # the last evaluation, and the best one (not the last, not the first)
    assert "rouge_l 0.450 at step 30 (best 0.470 at step 20, 3 evaluations)" in text
    assert "student 96, teacher 64 rows" in text and "0.5 versions old (max 1)" in text
    table = lines[lines.index("actors:") + 1:-2]  # a header, then one row per actor
    assert table[0].split()[:3] == ["name", "kind", "state"]
    rows = {l.split()[0]: l.split() for l in table[1:]}
    assert set(rows) == {"student-0", "teacher-0", "learner-0"}
    assert rows["student-0"][1:4] == ["student", "alive", "1"] and rows["student-0"][-1] == "10.0.0.2"
    assert rows["teacher-0"][2] == "dead"
    assert lines[-2:] == ["health: UNHEALTHY", "  - teacher-0 is dead"]


def test_render_of_a_starting_job_leaves_out_what_it_lacks():
    text = render({"name": "x", "state": "starting", "step": 0}, {})
    assert text.splitlines() == ["job x: starting, step 0", "health: unknown (no /healthz answer)"]


@pytest.fixture
def served():
    status = JobStatus("served", total_steps=40, actor_timeout_s=60)
    server = StatusServer(status, port=0).start()
    yield status, server.url
    server.stop()


def test_ammd_status_reads_a_live_server(served, capsys):
    status, url = served
    status.update(state="training", step=10, weight_version=2,
                  actors={"student-0": {"state": "alive", "last_seen_s": 0.2, "kind": "student"}})
    status.record_loss(10, {"loss": 0.5, "lr": 1e-3})
    assert main(["status", url]) == 0
    out = capsys.readouterr().out
    assert out.startswith("job served: training, step 10/40 (25%), weight version 2")
    assert "losses at step 10: loss 0.5 (lr 0.001)" in out and out.rstrip().endswith("health: ok")

    assert main(["status", url.removeprefix("http://"), "--json"]) == 0  # host:port works too
    assert json.loads(capsys.readouterr().out)["step"] == 10


def test_ammd_status_says_why_a_job_is_unhealthy(served, capsys):
    status, url = served
    status.update(state="training", actors={"teacher-0": {"state": "dead", "last_error": "OOM killed"}})
    assert main(["status", url + "/status"]) == 0  # the /status URL itself works too
    assert "health: UNHEALTHY\n  - teacher-0 is dead: OOM killed" in capsys.readouterr().out


def test_watch_stops_when_the_job_has_finished(served, capsys):
    status, url = served
    status.update(state="finished", step=40)
    assert main(["status", url, "--watch", "0.1"]) == 0  # returns instead of polling forever
    assert "finished, step 40/40 (100%)" in capsys.readouterr().out


@pytest.mark.parametrize("suffix,why", [("/nope", "answered HTTP 404"), ("", "Connection refused")])
def test_a_url_that_is_not_a_job_is_one_line_and_exit_2(served, capsys, suffix, why):
    _, url = served
    if not suffix:  # a port nothing listens on
        from learner.learner_actor import free_port
        url = f"http://127.0.0.1:{free_port()}"
    assert main(["status", url + suffix]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ammd: error: ") and why in err and err.count("\n") == 1


def test_watch_needs_a_positive_period(served, capsys):
    assert main(["status", served[1], "--watch", "0"]) == 2
    assert "--watch 0: give a positive number" in capsys.readouterr().err
