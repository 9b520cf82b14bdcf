"""Checkpoint directories: complete or not used, and a resume refused when the config differs."""
import json

import pytest

from cluster import checkpoint
from cluster.checkpoint import ResumeError
from cluster.config import build_config


def save(root, step, keep=2):
    tmp = checkpoint.begin(root, step)
    (tmp / "payload").write_text(str(step))
    return checkpoint.commit(root, tmp, step, {"trainer": {"step": step}}, keep)


def test_latest_names_the_newest_complete_checkpoint_and_old_ones_are_pruned(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (10, 20, 30):
        save(root, step)
    assert checkpoint.latest(root).name == "step-000030"
    assert sorted(p.name for p in root.glob("step-*")) == ["step-000020", "step-000030"]
    assert checkpoint.load_state(checkpoint.latest(root)) == {"trainer": {"step": 30}}


def test_a_crash_mid_save_leaves_the_previous_checkpoint_in_use(tmp_path):
    root = tmp_path / "checkpoints"
    save(root, 10)
    tmp = checkpoint.begin(root, 20)  # the job dies while writing step 20
    (tmp / "payload").write_text("half")
    assert checkpoint.latest(root).name == "step-000010"
    # A renamed directory without its driver state (never written by commit) does not count.
    (root / "step-000020").mkdir()
    (root / "latest").write_text("step-000020")
    assert checkpoint.latest(root) is None


def test_nothing_to_resume_says_where_it_looked(tmp_path):
    with pytest.raises(ResumeError, match="does not exist"):
        checkpoint.find_resumable(tmp_path / "nope")
    (tmp_path / "run").mkdir()
    with pytest.raises(ResumeError, match="no complete checkpoint under .*learner.save_every"):
        checkpoint.find_resumable(tmp_path / "run")


def test_resume_refused_with_what_differs(tmp_path):
    cfg = build_config({"learner": {"lr": 1e-3}}).model_dump()
    fp = {"teacher": {"config.json": "a"}, "student": {"config.json": "b", "tokenizer.json": "c"}}
    saved = {"config": cfg, "fingerprints": fp}
    checkpoint.check_compatible(saved, cfg, fp)  # the same: accepted
    other = build_config({"learner": {"lr": 3e-3, "actors": 4}, "status": {"port": 9}}).model_dump()
    with pytest.raises(ResumeError) as err:
        checkpoint.check_compatible(saved, other, fp)
    text = str(err.value)
    assert "learner.lr: checkpoint 0.001, now 0.003" in text and "learner.actors: checkpoint 2, now 4" in text
    assert "status" not in text  # where the status page listens does not matter
    changed = json.loads(json.dumps(fp))
    changed["student"]["tokenizer.json"] = "d"
    with pytest.raises(ResumeError, match="the student model's tokenizer.json changed"):
        checkpoint.check_compatible(saved, cfg, changed)


def test_fingerprint_follows_the_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    first = checkpoint.fingerprint(str(tmp_path))
    (tmp_path / "config.json").write_text('{"a": 1}')
    assert checkpoint.fingerprint(str(tmp_path)) != first and set(first) == {"config.json"}


def test_pruning_never_drops_the_checkpoint_just_written(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (10, 20, 30):
        save(root, step)
    save(root, 20)  # a resumed job saving an earlier step again (its newer sibling is stale)
    assert checkpoint.latest(root).name == "step-000020"


def test_starting_over_sets_the_earlier_runs_checkpoints_aside(tmp_path):
    run = tmp_path / "run"
    save(checkpoint.checkpoints_root(run), 10)
    moved = checkpoint.set_aside(run)
    assert (moved / "step-000010" / "payload").read_text() == "10"
    assert checkpoint.latest(checkpoint.checkpoints_root(run)) is None
    assert checkpoint.set_aside(run) is None  # nothing left to move
