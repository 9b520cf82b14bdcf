"""The status app: health decisions, Prometheus exposition, and the app served for real by uvicorn."""
import json
import math
import time
from collections import Counter

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from services.status import JobStatus, StatusServer, health_problems, make_app, prometheus_text


def parse(text: str) -> dict[str, dict]:
    """Family name -> {"type", "samples": {(sample name, sorted labels): value}}; fails on repeats."""
    families = list(text_string_to_metric_families(text))
    names = Counter(f.name for f in families)
    assert not [n for n, k in names.items() if k > 1], f"families declared twice: {names}"
    return {f.name: {"type": f.type, "samples": {(s.name, tuple(sorted(s.labels.items()))): s.value
                                                 for s in f.samples}}
            for f in families}


def declared(text: str, keyword: str) -> list[str]:
    """Names on the ``# HELP``/``# TYPE`` lines."""
    return [line.split()[2] for line in text.splitlines() if line.startswith(f"# {keyword} ")]


RICH = {
    "name": "job", "state": "training", "step": 7, "total_steps": 100, "weight_version": 3,
    "rollout_tokens_per_s": 1234.5, "learner_tokens_per_s": 987.0,
    "buffer": {"rows_by_source": {"student": 5, "teacher": 7, "dataset": 0}},
    "rollout_usage": {"student": {"generated": 40, "trained": 36, "ratio": 1.111},
                      "teacher": {"generated": 8, "trained": 0, "ratio": None}},
    "losses": {"loss": 0.25, "d_on": 0.5, "lr": 1e-5, "grad_norm": 2.0, "note": "text", "flag": True},
    "evals": [{"step": 5, "weight_version": 2, "score": 0.4}, {"step": 7, "weight_version": 3, "score": 0.6}],
    "actors": {
        "student-0": {"state": "alive", "last_seen_s": 1.5, "restarts": 2, "last_error": None, "kind": "student"},
        "teacher-0": {"state": "dead", "last_seen_s": 30.0, "restarts": 0, "last_error": "OOM", "kind": "teacher"},
        "learner-0": {"state": "restarting", "last_seen_s": None, "restarts": 1, "kind": "learner"},
        "buffer": {"state": "starting", "last_seen_s": None},  # an older snapshot: no kind, no restarts
    },
}


# --- /metrics -----------------------------------------------------------------------------------

def test_prometheus_text_declares_each_family_once_with_its_samples():
    text = prometheus_text(RICH)
    helps, types = declared(text, "HELP"), declared(text, "TYPE")
    assert len(helps) == len(set(helps)) and helps == types
    m = parse(text)
    for family in ("ammd_step", "ammd_total_steps", "ammd_weight_version", "ammd_rollout_tokens_per_second",
                   "ammd_learner_tokens_per_second", "ammd_buffer_rows", "ammd_loss", "ammd_eval_score",
                   "ammd_actor_up", "ammd_actor_last_seen_seconds"):
        assert m[family]["type"] == "gauge", family
    assert m["ammd_step"]["samples"] == {("ammd_step", ()): 7.0}
    assert m["ammd_rollout_tokens_per_second"]["samples"] == {("ammd_rollout_tokens_per_second", ()): 1234.5}
    assert m["ammd_buffer_rows"]["samples"] == {
        ("ammd_buffer_rows", (("source", s),)): v for s, v in (("student", 5), ("teacher", 7), ("dataset", 0))}
    # Counters: the parser files the _total samples under the family without the suffix.
    assert m["ammd_rows_generated"]["type"] == "counter"
    assert m["ammd_rows_generated"]["samples"] == {("ammd_rows_generated_total", (("source", "student"),)): 40,
                                                   ("ammd_rows_generated_total", (("source", "teacher"),)): 8}
    assert m["ammd_rows_trained"]["samples"][("ammd_rows_trained_total", (("source", "student"),))] == 36
    assert m["ammd_eval_score"]["samples"] == {("ammd_eval_score", ()): 0.6}


def test_prometheus_text_losses_are_one_family_labelled_by_term():
    m = parse(prometheus_text(RICH))
    assert m["ammd_loss"]["samples"] == {("ammd_loss", (("term", t),)): v
                                         for t, v in (("loss", 0.25), ("d_on", 0.5), ("lr", 1e-5), ("grad_norm", 2.0))}


def test_prometheus_text_actor_families():
    m = parse(prometheus_text(RICH))

    def actor(name: str, kind: str) -> tuple:
        return (("actor", name), ("kind", kind))

    assert m["ammd_actor_up"]["samples"] == {
        ("ammd_actor_up", actor("student-0", "student")): 1.0, ("ammd_actor_up", actor("teacher-0", "teacher")): 0.0,
        ("ammd_actor_up", actor("learner-0", "learner")): 0.0, ("ammd_actor_up", actor("buffer", "buffer")): 1.0}
    # A counter: the parser files the _total samples under the family without the suffix.
    restarts = m["ammd_actor_restarts"]
    assert restarts["type"] == "counter"
    assert restarts["samples"] == {("ammd_actor_restarts_total", actor("student-0", "student")): 2.0,
                                   ("ammd_actor_restarts_total", actor("teacher-0", "teacher")): 0.0,
                                   ("ammd_actor_restarts_total", actor("learner-0", "learner")): 1.0}
    assert m["ammd_actor_last_seen_seconds"]["samples"] == {
        ("ammd_actor_last_seen_seconds", actor("student-0", "student")): 1.5,
        ("ammd_actor_last_seen_seconds", actor("teacher-0", "teacher")): 30.0}


def test_prometheus_text_kind_falls_back_to_the_name_prefix():
    m = parse(prometheus_text({"actors": {"teacher-3": {"state": "alive"}, "odd": {"state": "alive"}}}))
    assert set(m["ammd_actor_up"]["samples"]) == {("ammd_actor_up", (("actor", "teacher-3"), ("kind", "teacher"))),
                                                  ("ammd_actor_up", (("actor", "odd"), ("kind", "unknown")))}


def test_prometheus_text_label_values_round_trip_through_the_parser():
    nasty = 'a\\b "quoted"\nnext line'
    m = parse(prometheus_text({"buffer": {"rows_by_source": {nasty: 3}},
                               "actors": {nasty: {"state": "alive", "kind": 'k"\\'}}}))
    assert m["ammd_buffer_rows"]["samples"] == {("ammd_buffer_rows", (("source", nasty),)): 3.0}
    assert set(m["ammd_actor_up"]["samples"]) == {("ammd_actor_up", (("actor", nasty), ("kind", 'k"\\')))}


def test_prometheus_text_skips_non_numbers():
    text = prometheus_text({"step": 2, "name": "x", "weight_version": None, "losses": {"loss": float("nan")},
                            "buffer": None, "rollout_usage": {"student": None}, "evals": [{"score": None}],
                            "actors": {"a": "not a dict"}})
    m = parse(text)
    assert "name" not in text and "ammd_weight_version" not in m and "ammd_eval_score" not in m
    assert m["ammd_step"]["samples"] == {("ammd_step", ()): 2.0}
    assert math.isnan(m["ammd_loss"]["samples"][("ammd_loss", (("term", "loss"),))])  # NaN is a number
    assert "ammd_loss{term=\"loss\"} NaN" in text
    assert prometheus_text({}) == ""


# --- health -------------------------------------------------------------------------------------

def snap(actors: dict, state: str = "training", **extra) -> dict:
    return {"state": state, "actors": actors, **extra}


@pytest.mark.parametrize("actors", [
    {},
    {"student-0": {"state": "alive", "last_seen_s": 599.0}},
    {"student-0": {"state": "starting", "last_seen_s": None}, "learner-0": {"state": "restarting"}},
])
def test_health_problems_none_while_actors_are_fine(actors):
    assert health_problems(snap(actors), 600.0) == []


def test_health_problems_dead_and_silent_actors():
    actors = {"student-0": {"state": "dead", "last_seen_s": 2.0, "last_error": "CUDA OOM"},
              "teacher-0": {"state": "dead"},
              "learner-1": {"state": "alive", "last_seen_s": 912.4, "kind": "learner"},
              "buffer": {"state": "alive", "last_seen_s": 0.0}}
    assert health_problems(snap(actors), 600.0) == [
        "student-0 is dead: CUDA OOM", "teacher-0 is dead", "learner-1 silent for 912 s (timeout 600 s)"]


def test_health_problems_counts_the_time_since_the_snapshot_was_published():
    actors = {"learner-0": {"state": "alive", "last_seen_s": 100.0}}
    assert health_problems(snap(actors, updated_at=1000.0), 600.0, now=1400.0) == []
    assert health_problems(snap(actors, updated_at=1000.0), 600.0, now=1600.0) == [
        "learner-0 silent for 700 s (timeout 600 s)"]


def test_health_problems_failed_and_finished_jobs():
    dead = {"student-0": {"state": "dead", "last_error": "gone"}}
    assert health_problems(snap({}, "failed"), 600.0) == ["job failed"]
    assert health_problems(snap(dead, "failed", error="ValueError: bad batch"), 600.0) == [
        "job failed: ValueError: bad batch", "student-0 is dead: gone"]
    assert health_problems(snap(dead, "finished"), 600.0) == []


# --- the app ------------------------------------------------------------------------------------

def healthz(status: JobStatus) -> httpx.Response:
    return TestClient(make_app(status)).get("/healthz")


def test_healthz_ok_while_healthy_and_when_finished():
    status = JobStatus("t", total_steps=10)
    status.update(state="training", actors={"student-0": {"state": "alive", "last_seen_s": 3.0}})
    r = healthz(status)
    assert (r.status_code, r.json()) == (200, {"status": "ok", "state": "training"})
    status.update(state="finished", actors={"student-0": {"state": "dead", "last_seen_s": 3.0}})
    assert healthz(status).status_code == 200


def test_healthz_503_for_a_dead_actor():
    status = JobStatus("t", total_steps=10)
    status.update(state="training", actors={
        "student-0": {"state": "dead", "last_seen_s": 5.0, "restarts": 1, "last_error": "OOM", "kind": "student"}})
    r = healthz(status)
    assert r.status_code == 503
    assert r.json() == {"status": "unhealthy", "state": "training", "reasons": ["student-0 is dead: OOM"]}


def test_healthz_503_for_an_actor_silent_beyond_the_timeout():
    status = JobStatus("t", total_steps=10, actor_timeout_s=60.0)
    status.update(state="training", actors={"learner-1": {"state": "alive", "last_seen_s": 30.0}})
    assert healthz(status).status_code == 200
    status.update(actors={"learner-1": {"state": "alive", "last_seen_s": 90.0}})
    r = healthz(status)
    assert r.status_code == 503
    assert r.json()["reasons"] == ["learner-1 silent for 90 s (timeout 60 s)"]


def test_healthz_503_for_a_failed_job():
    status = JobStatus("t", total_steps=10)
    status.update(state="failed", error="RuntimeError: learner crashed")
    r = healthz(status)
    assert r.status_code == 503
    assert r.json() == {"status": "unhealthy", "state": "failed", "reasons": ["job failed: RuntimeError: learner crashed"]}


def test_metrics_endpoint_serves_valid_exposition():
    status = JobStatus("t", total_steps=10)
    status.update(**{k: v for k, v in RICH.items() if k not in ("name", "total_steps")})
    status.record_loss(7, RICH["losses"])
    r = TestClient(make_app(status)).get("/metrics")
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    m = parse(r.text)
    assert m["ammd_total_steps"]["samples"] == {("ammd_total_steps", ()): 10.0}
    assert m["ammd_loss"]["samples"][("ammd_loss", (("term", "d_on"),))] == 0.5


def test_status_endpoints_serve_the_driver_state():
    status = JobStatus("t", total_steps=10)
    server = StatusServer(status, "127.0.0.1", 0).start()
    try:
        status.update(state="training", step=3, weight_version=1,
                      buffer={"rows_by_source": {"student": 5, "teacher": 7, "dataset": 0}},
                      actors={"student-0": {"state": "alive", "last_seen_s": 0.5}})
        status.record_loss(3, {"loss": 0.25})
        with httpx.Client(base_url=server.url, timeout=5) as c:
            assert c.get("/healthz").json()["status"] == "ok"
            s = c.get("/status").json()
            assert (s["step"], s["weight_version"], s["state"]) == (3, 1, "training")
            assert s["buffer"]["rows_by_source"]["teacher"] == 7
            assert s["losses"] == {"loss": 0.25}
            m = parse(c.get("/metrics").text)
            assert m["ammd_buffer_rows"]["samples"][("ammd_buffer_rows", (("source", "student"),))] == 5.0
            assert m["ammd_loss"]["samples"] == {("ammd_loss", (("term", "loss"),)): 0.25}
            assert "<canvas" in c.get("/").text
            status.update(state="failed", error="boom")
            r = c.get("/healthz")
            assert (r.status_code, r.json()["reasons"]) == (503, ["job failed: boom"])
    finally:
        server.stop()


def test_job_status_health_uses_its_timeout():
    status = JobStatus("t", total_steps=1, actor_timeout_s=5.0)
    status.update(actors={"buffer": {"state": "alive", "last_seen_s": 6.0}})
    assert status.health() == ["buffer silent for 6 s (timeout 5 s)"]
    assert time.time() - status.snapshot()["updated_at"] < 5.0


# --- issue 21: a snapshot per write, not per request; no schema routes; the Host header --------

def test_readers_share_one_rendering_per_write_and_see_every_write():
    status = JobStatus("t", total_steps=10)
    status.update(step=1)
    first = status.status_json()
    assert status.status_json() is first and status.metrics_text() is status.metrics_text()
    assert status.view() is status.view()
    status.record_loss(1, {"loss": 0.5})
    assert status.status_json() is not first and json.loads(status.status_json())["losses"] == {"loss": 0.5}
    status.record_throughput(1, 10.0, 20.0)
    assert json.loads(status.status_json())["throughput"][0]["learner_tokens_per_s"] == 10.0
    status.update(step=2)
    assert status.view()["step"] == 2 and "ammd_step 2.0" in status.metrics_text()


def test_status_json_is_strict_json_when_a_loss_is_not_finite():
    status = JobStatus("t", total_steps=10)
    status.record_loss(1, {"loss": float("nan"), "grad_norm": float("inf")})
    body = TestClient(make_app(status)).get("/status")
    assert body.status_code == 200 and "NaN" not in body.text
    assert body.json()["losses"] == {"loss": None, "grad_norm": None}


@pytest.mark.parametrize("path", ["/openapi.json", "/docs", "/redoc"])
def test_schema_and_docs_routes_are_off(path):
    assert TestClient(make_app(JobStatus("t", 10))).get(path).status_code == 404


def test_a_foreign_host_header_is_refused():
    """A DNS-rebinding page (evil.example resolving to 127.0.0.1) sends its own Host."""
    from services.status import allowed_hosts
    app = make_app(JobStatus("t", 10), allowed_hosts("127.0.0.1"))
    assert TestClient(app, base_url="http://127.0.0.1:8000").get("/status").status_code == 200
    assert TestClient(app, base_url="http://localhost:8000").get("/status").status_code == 200
    assert TestClient(app, base_url="http://evil.example:8000").get("/status").status_code == 400
    assert allowed_hosts("0.0.0.0") == ["*"] and "10.1.2.3" in allowed_hosts("10.1.2.3")
