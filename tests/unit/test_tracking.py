"""Trackers: TensorBoard event files read back with TensorBoard's own reader, W&B through a
stand-in module, and the registry that builds them from the config."""
import math
import random
import sys
import types

import pytest

from cluster import tracking
from cluster.config import ConfigError, build_config
from services.metrics import samples
from tests.tb_events import read_events, read_scalars

SNAP = {
    "name": "job", "state": "training", "step": 3, "total_steps": 10, "weight_version": 1,
    "rollout_tokens_per_s": 812.25, "learner_tokens_per_s": 301.5,
    "buffer": {"rows_by_source": {"student": 5, "teacher": 7}},
    "rollout_usage": {"student": {"generated": 40, "trained": 36, "ratio": 1.1}},
    "losses": {"loss": 0.1 + 0.2, "grad_norm": 2.0, "lr": 1e-3},
    "evals": [{"step": 2, "weight_version": 1, "score": 0.4}],
    "actors": {"student-0": {"state": "alive", "last_seen_s": 1.5, "restarts": 2, "kind": "student",
                             "tokens_per_s": 400.0},
               "learner-0": {"state": "dead", "last_seen_s": 30.0, "restarts": 0, "kind": "learner"}},
}


def history(steps, seed=0, amm=False):
    """Records as Trainer.history holds them, with values no float32 could hold exactly."""
    rng = random.Random(seed)
    keys = ["grad_norm", "loss", "lr"] + (["adversary_loss", "d_off", "d_on"] if amm else [])
    return [{"step": s, **{k: rng.random() / 3 for k in keys}} for s in steps]


def test_step_scalars_equal_the_history_to_the_last_bit(tmp_path):
    records = history(range(1, 9), amm=True)
    tb = tracking.TensorBoardTracker(tmp_path / "tb")
    for r in records:
        tb.log_step(r)
    tb.close()
    got = read_scalars(tmp_path / "tb")
    keys = set(records[0]) - {"step"}
    assert set(got) == {f"train/{k}" for k in keys}
    for k in keys:
        assert got[f"train/{k}"] == {r["step"]: r[k] for r in records}  # exact, float64


def test_snapshot_scalars_are_the_metrics_samples(tmp_path):
    tb = tracking.TensorBoardTracker(tmp_path / "tb")
    tb.log_snapshot(3, SNAP)
    later = {**SNAP, "step": 4, "learner_tokens_per_s": 0.7}
    tb.log_snapshot(4, later)
    tb.close()
    got = read_scalars(tmp_path / "tb")
    for step, snap in ((3, SNAP), (4, later)):
        expected = {tracking.metric_tag(n, labels): v for n, labels, v in samples(snap)}
        assert expected and {tag: got[tag][step] for tag in expected} == expected
    assert set(got) == {tracking.metric_tag(n, labels) for n, labels, _ in samples(SNAP)}
    assert got["ammd_buffer_rows/source=teacher"] == {3: 7.0, 4: 7.0}
    assert got["ammd_actor_up/actor=learner-0,kind=learner"][3] == 0.0


def test_a_resumed_run_replaces_the_steps_it_runs_again(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    cfg = build_config({})
    first, again = history(range(1, 7), seed=1), history(range(4, 9), seed=2)
    trackers = tracking.start(cfg, tmp_path)
    for r in first:  # the interrupted run got to step 6; its checkpoint holds step 3
        trackers.log_step(r)
        trackers.log_snapshot(r["step"], {**SNAP, "step": r["step"]})
    trackers.close()
    trackers = tracking.start(cfg, tmp_path, resumed=first[:3])
    for r in again:
        trackers.log_step(r)
    trackers.close()
    got = read_scalars(tmp_path / "tb")  # read_scalars also fails on a step seen twice
    assert got["train/loss"] == {r["step"]: r["loss"] for r in first[:3] + again}
    assert set(got["ammd_step"]) == {1, 2, 3}  # the checkpoint's snapshots, none of the lost steps
    (old,) = tmp_path.glob("previous-*/tb")  # the interrupted run's files, all of them
    before = read_events(old)["ammd_step"]
    assert set(before) == set(range(1, 7))
    after = read_events(tmp_path / "tb")["ammd_step"]
    assert after == {s: before[s] for s in (1, 2, 3)}  # wall times kept too


def test_a_resume_holds_the_checkpoints_steps_whatever_the_killed_run_flushed(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    cfg = build_config({})
    saved = history(range(1, 5), seed=3)  # the checkpoint holds steps 1-4
    trackers = tracking.start(cfg, tmp_path)
    for r in saved[:2]:  # the killed run's writer had flushed steps 1-2 only
        trackers.log_step(r)
        trackers.log_snapshot(r["step"], {**SNAP, "step": r["step"]})
    trackers.close()
    (events,) = (tmp_path / "tb").glob("events.out.tfevents.*")
    events.write_bytes(events.read_bytes()[:-7])  # and its last record was cut short by the kill
    tracking.start(cfg, tmp_path, resumed=saved).close()
    got = read_scalars(tmp_path / "tb")
    assert got["train/loss"] == {r["step"]: r["loss"] for r in saved}
    assert set(got["ammd_step"]) == {1, 2}


class FakeWandb:
    """Stands in for the ``wandb`` module, which is not installed here and would need a network
    and an account: records what ammd calls (init's arguments, each log, finish) instead."""

    def __init__(self):
        self.inits, self.logged, self.finished = [], [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        fake = self

        class Run:
            def log(self, data, step):
                fake.logged.append((step, dict(data)))

            def finish(self):
                fake.finished += 1
        return Run()


@pytest.fixture
def fake_wandb(monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=fake.init))
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    return fake


def test_wandb_gets_what_tensorboard_gets(tmp_path, fake_wandb, capsys):
    cfg = build_config({"name": "j", "tracking": {"wandb_project": "distill"}})
    trackers = tracking.start(cfg, tmp_path / "j")
    assert set(trackers.trackers) == {"TensorBoard", "W&B"}
    records = history(range(1, 4))
    for r in records:
        trackers.log_step(r)
        trackers.log_snapshot(r["step"], {**SNAP, "step": r["step"]})
    trackers.close()
    (init,) = fake_wandb.inits
    assert init["project"] == "distill" and init["name"] == "j" and init["config"] == cfg.model_dump()
    assert init["id"] == (tmp_path / "j" / tracking.WANDB_ID_FILE).read_text()
    assert fake_wandb.finished == 1
    by_step: dict[int, dict] = {}
    for step, data in fake_wandb.logged:
        by_step.setdefault(step, {}).update(data)
    tb = read_scalars(tmp_path / "j" / "tb")
    assert {tag: {s: d[tag] for s, d in by_step.items()} for tag in tb} == tb
    assert "W&B project distill" in capsys.readouterr().out

    # A resumed job continues the same W&B run.
    tracking.start(cfg, tmp_path / "j", resumed=records[:2]).close()
    assert fake_wandb.inits[1]["id"] == init["id"] and fake_wandb.inits[1]["resume"] == "allow"
    tracking.start(cfg, tmp_path / "j").close()  # a new job under the name: a new run
    assert fake_wandb.inits[2]["id"] != init["id"]


def test_wandb_project_from_the_environment(tmp_path, fake_wandb, monkeypatch):
    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    tracking.start(build_config({"tracking": {"tensorboard": False}}), tmp_path).close()
    assert fake_wandb.inits[0]["project"] == "from-env"


def test_without_wandb_configured_a_notice_and_no_error(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: import raises
    trackers = tracking.start(build_config({}), tmp_path / "run")
    trackers.close()
    out = capsys.readouterr().out.splitlines()
    notice = [line for line in out if "tracking:" in line]
    assert len(notice) == 1 and "W&B off" in notice[0] and str(tmp_path / "run" / "tb") in notice[0]


@pytest.mark.parametrize("by_env", [False, True])
def test_wandb_configured_but_not_installed_is_a_config_error(tmp_path, monkeypatch, by_env):
    monkeypatch.setitem(sys.modules, "wandb", None)
    if by_env:
        monkeypatch.setenv("WANDB_PROJECT", "p")
        cfg = build_config({})
    else:
        monkeypatch.delenv("WANDB_PROJECT", raising=False)
        cfg = build_config({"tracking": {"wandb_project": "p"}})
    with pytest.raises(ConfigError, match="WANDB_PROJECT" if by_env else "tracking.wandb_project") as err:
        tracking.start(cfg, tmp_path)
    assert "pip install wandb" in str(err.value)
    assert not (tmp_path / "tb").exists()  # refused before anything was written


def test_config_refuses_an_empty_project_and_tensorboard_can_be_off(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="tracking.wandb_project"):
        build_config({"tracking": {"wandb_project": ""}})
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    tracking.start(build_config({}, ["tracking.tensorboard=false"]), tmp_path).close()
    assert not (tmp_path / "tb").exists()


def test_a_new_job_sets_the_old_event_files_aside(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    cfg = build_config({})
    for steps in (range(1, 5), range(1, 3)):
        trackers = tracking.start(cfg, tmp_path)
        for r in history(steps, seed=len(steps)):
            trackers.log_step(r)
        trackers.close()
    assert set(read_scalars(tmp_path / "tb")["train/loss"]) == {1, 2}
    (old,) = tmp_path.glob("previous-*/tb")
    assert set(read_scalars(old)["train/loss"]) == {1, 2, 3, 4}


def test_a_failing_tracker_is_dropped_and_the_others_go_on(capsys):
    class Broken:
        def log_step(self, record):
            raise OSError("disk full")

    class Kept:
        steps: list = []

        def log_step(self, record):
            self.steps.append(record["step"])

    kept = Kept()
    trackers = tracking.Trackers({"broken": Broken(), "kept": kept})
    for r in history(range(1, 4)):
        trackers.log_step(r)
    assert kept.steps == [1, 2, 3] and set(trackers.trackers) == {"kept"}
    warned = [line for line in capsys.readouterr().out.splitlines() if "disk full" in line]
    assert len(warned) == 1 and "broken tracking stopped" in warned[0]


def test_metric_tag():
    assert tracking.metric_tag("ammd_step", {}) == "ammd_step"
    assert tracking.metric_tag("ammd_x", {"a": "1", "b": "y"}) == "ammd_x/a=1,b=y"
    assert math.isclose(tracking.step_scalars({"step": 2, "loss": 1})["train/loss"], 1.0)
