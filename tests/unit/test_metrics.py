"""services.metrics: the families a job's /metrics serves, read back with prometheus_client's parser.

Hand-built snapshots (an AMM job with several rollout actors, one of them dead; snapshots missing
fields) stand in for the driver's; the text is parsed by ``prometheus_client.parser``, the
reference reader, not by string matching.
"""
import json
import re
from collections import Counter
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from services.metrics import FAMILIES, PREFIX, metric_names, prometheus_text, samples
from services.status import JobStatus

AMM = {
    "name": "amm-job", "state": "training", "step": 40, "total_steps": 600, "weight_version": 10,
    "weight_pushes": 11, "weight_push_seconds": 0.375,
    "rollout_tokens_per_s": 900.0, "learner_tokens_per_s": 450.5,
    "losses": {"loss": 1.25, "d_on": 0.125, "d_off": -0.5, "adversary_loss": 2.5, "grad_norm": 3.0, "lr": 1e-4},
    "evals": [{"step": 20, "weight_version": 5, "score": 0.25}, {"step": 40, "weight_version": 10, "score": 0.5}],
    "buffer": {"rows_by_source": {"student": 64, "teacher": 32}, "appended_by_source": {"student": 700}},
    "rollout_usage": {"student": {"generated": 700, "trained": 640, "ratio": 1.094},
                      "teacher": {"generated": 330, "trained": 320, "ratio": 1.031}},
    "sampled_age": {"mean": 0.75, "max": 2},
    "actors": {
        "student-0": {"state": "alive", "last_seen_s": 0.5, "restarts": 1, "kind": "student", "tokens_per_s": 400.0},
        "student-1": {"state": "alive", "last_seen_s": 1.0, "restarts": 0, "kind": "student", "tokens_per_s": 350.0},
        "teacher-0": {"state": "alive", "last_seen_s": 2.0, "restarts": 0, "kind": "teacher", "tokens_per_s": 150.0},
        "teacher-1": {"state": "dead", "last_seen_s": 95.0, "restarts": 3, "kind": "teacher", "tokens_per_s": 0.0,
                      "last_error": "OOM"},
        "learner-0": {"state": "alive", "last_seen_s": 0.25, "restarts": 0, "kind": "learner"},
        "buffer": {"state": "alive", "last_seen_s": 0.0, "restarts": 0, "kind": "buffer"},
    },
    "throughput": [{"step": 40, "t": 12.0, "learner_tokens_per_s": 450.5, "rollout_tokens_per_s": 900.0}],
}


def parse(text: str) -> dict[str, dict]:
    """Family -> {"type", "samples": {(sample name, sorted labels): value}}; fails on a repeated family."""
    families = list(text_string_to_metric_families(text))
    repeated = [n for n, k in Counter(f.name for f in families).items() if k > 1]
    assert not repeated, f"families declared twice: {repeated}"
    return {f.name: {"type": f.type, "samples": {(s.name, tuple(sorted(s.labels.items()))): s.value
                                                 for s in f.samples}}
            for f in families}


def values(m: dict, family: str, label: str) -> dict[str, float]:
    """One family's samples keyed by the value of ``label``."""
    return {dict(labels)[label]: v for (_, labels), v in m[family]["samples"].items()}


def test_every_family_is_declared_once_and_the_amm_snapshot_fills_them_all():
    text = prometheus_text(AMM)
    declared = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(declared) == len(set(declared)) == len(FAMILIES)
    m = parse(text)
    # The parser names a counter family without its _total suffix.
    assert {PREFIX + f.name.removesuffix("_total") if f.type == "counter" else PREFIX + f.name
            for f in FAMILIES} == set(m)
    for f in FAMILIES:
        assert f.name.endswith("_total") == (f.type == "counter"), f.name


def test_loss_terms_amm_included_are_one_family():
    m = parse(prometheus_text(AMM))
    assert values(m, "ammd_loss", "term") == AMM["losses"]
    assert m["ammd_loss"]["type"] == "gauge"


def test_scalars_equal_the_snapshot():
    m = parse(prometheus_text(AMM))
    expect = {"ammd_step": 40, "ammd_total_steps": 600, "ammd_weight_version": 10, "ammd_weight_push_seconds": 0.375,
              "ammd_learner_tokens_per_second": 450.5, "ammd_rollout_tokens_per_second": 900.0,
              "ammd_eval_score": 0.5}
    for family, value in expect.items():
        assert m[family]["samples"] == {(family, ()): value}, family
    assert m["ammd_weight_pushes"] == {"type": "counter", "samples": {("ammd_weight_pushes_total", ()): 11}}


def test_per_source_families():
    m = parse(prometheus_text(AMM))
    assert values(m, "ammd_buffer_rows", "source") == {"student": 64, "teacher": 32}
    assert values(m, "ammd_rows_generated", "source") == {"student": 700, "teacher": 330}
    assert values(m, "ammd_rows_trained", "source") == {"student": 640, "teacher": 320}
    assert values(m, "ammd_sampled_row_age_versions", "stat") == {"mean": 0.75, "max": 2}


def test_per_actor_families_label_actor_and_kind_and_a_dead_actor_is_down():
    m = parse(prometheus_text(AMM))
    labels = {labels for _, labels in m["ammd_actor_up"]["samples"]}
    assert labels == {(("actor", name), ("kind", info["kind"])) for name, info in AMM["actors"].items()}
    up = values(m, "ammd_actor_up", "actor")
    assert up == {name: (0.0 if name == "teacher-1" else 1.0) for name in AMM["actors"]}
    assert values(m, "ammd_actor_restarts", "actor") == {n: i["restarts"] for n, i in AMM["actors"].items()}
    assert values(m, "ammd_actor_last_seen_seconds", "actor") == {n: i["last_seen_s"] for n, i in AMM["actors"].items()}
    # Only the rollout actors make tokens; the dead one is still listed, at its rate.
    assert values(m, "ammd_rollout_actor_tokens_per_second", "actor") == {
        "student-0": 400.0, "student-1": 350.0, "teacher-0": 150.0, "teacher-1": 0.0}


@pytest.mark.parametrize("state", ["starting", "training", "failed"])
def test_job_state_is_one_hot(state):
    m = parse(prometheus_text({**AMM, "state": state}))
    states = values(m, "ammd_job_state", "state")
    assert set(states) == {"starting", "evaluating", "training", "finished", "failed"}
    assert {s for s, v in states.items() if v == 1.0} == {state} and sum(states.values()) == 1.0


def test_an_unknown_job_state_is_still_shown():
    m = parse(prometheus_text({"state": "paused"}))
    assert values(m, "ammd_job_state", "state")["paused"] == 1.0


def test_missing_and_null_fields_leave_their_families_out():
    assert prometheus_text({}) == "" and samples({}) == []
    sparse = {"step": 3, "sampled_age": None, "weight_push_seconds": None, "evals": [],
              "actors": {"student-0": {"state": "alive"}, "learner-0": {"state": "alive", "tokens_per_s": None}},
              "losses": {"loss": 0.5, "note": "text", "flag": True}}
    m = parse(prometheus_text(sparse))
    assert set(m) == {"ammd_step", "ammd_loss", "ammd_actor_up"}
    assert values(m, "ammd_loss", "term") == {"loss": 0.5}


def test_samples_are_the_numbers_the_text_serves():
    # TensorBoard logs samples(); /metrics serves the text: the same (name, labels, value) triples.
    served = {(s.name, tuple(sorted(s.labels.items())), s.value)
              for f in text_string_to_metric_families(prometheus_text(AMM)) for s in f.samples}
    flat = samples(AMM)
    assert {(name, tuple(sorted(labels.items())), value) for name, labels, value in flat} == served
    assert len(flat) == len(served)
    assert {name for name, _, _ in flat} == metric_names()


def test_job_status_keeps_the_last_throughput_points():
    status = JobStatus("t", total_steps=10)
    for step in range(1, 6):
        status.record_throughput(step, 10.0 * step, 20.0 * step, keep=3)
    series = status.snapshot()["throughput"]
    assert [p["step"] for p in series] == [3, 4, 5]
    assert series[-1]["learner_tokens_per_s"] == 50.0 and series[-1]["rollout_tokens_per_s"] == 100.0
    assert 0.0 <= series[0]["t"] <= series[-1]["t"]


def test_rollout_actors_get_their_rates_and_zero_before_their_first_rows():
    from cluster.observers import _with_actor_rates
    health = {"student-0": {"kind": "student"}, "teacher-0": {"kind": "teacher"},
              "learner-0": {"kind": "learner"}, "buffer": {"kind": "buffer"}}
    out = _with_actor_rates(health, {"student-0": 12.5})
    assert {n: i.get("tokens_per_s") for n, i in out.items()} == {
        "student-0": 12.5, "teacher-0": 0.0, "learner-0": None, "buffer": None}


def test_sampled_age_of_a_batch():
    # The real method on a real buffer batch; Trainer.__new__ skips the actors the method never uses,
    # and the push object has no routes: the method only reads the version it holds.
    from cluster.trainer import Trainer
    from cluster.weight_push import WeightPush
    from services.buffer_schema import rows_to_batch
    from tests.unit.test_replay_buffer import make_row

    from cluster.job_state import JobState

    trainer = Trainer.__new__(Trainer)
    trainer.weight_push, trainer.state = WeightPush(None, None, lambda: 0), JobState()
    trainer.weight_push.version = 7
    rows = [make_row(0, "student", version=7), make_row(1, "student", version=5),
            make_row(2, "teacher", version=0), make_row(3, "student", version=6)]
    trainer._note_lag(rows_to_batch(rows))
    assert trainer.state.sampled_age == {"mean": 1.0, "max": 2} and trainer.state.max_lag == 2
    trainer._note_lag(rows_to_batch([make_row(4, "teacher", version=0)]))
    assert trainer.state.sampled_age is None and trainer.state.max_lag == 2


# --- docker/: Prometheus and Grafana read these families -----------------------------------------

DOCKER = Path(__file__).resolve().parents[2] / "docker"


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def dashboard_queries() -> list[str]:
    dash = json.loads((DOCKER / "grafana" / "dashboards" / "ammd.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return exprs


def test_the_dashboard_charts_every_family_and_names_no_other_metric():
    # The dashboard cannot drift from the code: a renamed family fails here, not in a blank panel.
    used = {name for expr in dashboard_queries() for name in re.findall(r"\bammd_[A-Za-z0-9_]+", expr)}
    assert used <= metric_names(), sorted(used - metric_names())
    assert metric_names() <= used, f"families without a panel: {sorted(metric_names() - used)}"


def test_the_dashboard_uses_the_provisioned_prometheus():
    dash = json.loads((DOCKER / "grafana" / "dashboards" / "ammd.json").read_text())
    (source,) = load_yaml(DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    uids = {p["datasource"]["uid"] for p in dash["panels"]} | {
        t["datasource"]["uid"] for p in dash["panels"] for t in p["targets"]}
    assert uids == {source["uid"]} and source["type"] == "prometheus"
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    provider = load_yaml(DOCKER / "grafana" / "provisioning" / "dashboards" / "ammd.yml")["providers"][0]
    compose = load_yaml(DOCKER / "docker-compose.yml")["services"]
    # The provider's folder is where compose mounts grafana/dashboards, and the datasource
    # reaches the prometheus service on the port it listens on.
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in compose["grafana"]["volumes"]
    assert source["url"] == "http://prometheus:9090"
    assert any(port.endswith(":9090") for port in compose["prometheus"]["ports"])


def test_prometheus_scrapes_the_jobs_status_port():
    from services.status import ENDPOINTS

    config = load_yaml(DOCKER / "prometheus" / "prometheus.yml")
    (scrape,) = config["scrape_configs"]
    assert scrape["metrics_path"] in ENDPOINTS
    job = load_yaml(DOCKER / "docker-compose.yml")["services"]["job"]
    port = next(arg.split("=", 1)[1] for arg in job["command"] if arg.startswith("status.port="))
    assert scrape["static_configs"] == [{"targets": [f"job:{port}"]}]


def test_monitoring_services_start_only_with_their_profile():
    services = load_yaml(DOCKER / "docker-compose.yml")["services"]
    assert {name for name, s in services.items() if "monitoring" in s.get("profiles", [])} == {"prometheus", "grafana"}
    assert "profiles" not in services["job"] and "profiles" not in services["probe"]
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source = volume.split(":", 1)[0]
            assert (DOCKER / source).exists(), f"{name} mounts {source}, which is not in docker/"
