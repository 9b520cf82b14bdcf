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


# --- issue 21: checksums before unpickling, private files ---------------------------------------

def test_a_committed_checkpoint_is_sealed_private_and_verified(tmp_path):
    root = tmp_path / "checkpoints"
    ckpt = save(root, 10)
    (ckpt / "buffer").mkdir(mode=0o755)  # written after the seal: not listed
    listed = json.loads((ckpt / "checksums.json").read_text())["files"]
    assert set(listed) == {"payload", "driver.json"}
    assert ckpt.stat().st_mode & 0o777 == 0o700 and (ckpt / "payload").stat().st_mode & 0o777 == 0o600
    checkpoint.verify(ckpt)  # an empty directory is no file
    (ckpt / "buffer" / "evil.pt").write_bytes(b"x")
    with pytest.raises(checkpoint.CheckpointError, match=r"does not list \(buffer/evil.pt\)"):
        checkpoint.verify(ckpt)
    (ckpt / "buffer" / "evil.pt").unlink()
    (ckpt / "payload").write_text("99")  # same size, other bytes
    with pytest.raises(checkpoint.CheckpointError, match=r"payload differs from its checksum"):
        checkpoint.verify(ckpt)


def test_a_buffer_segment_is_left_to_the_buffers_own_checksum(tmp_path):
    """A rotten segment costs its rows (the buffer skips and reports it), not the checkpoint."""
    root = tmp_path / "checkpoints"
    tmp = checkpoint.begin(root, 10)
    (tmp / "buffer").mkdir()
    (tmp / "buffer" / "segment-000000000000.arrow").write_bytes(b"rows")
    (tmp / "buffer" / "manifest.json").write_text("{}")
    ckpt = checkpoint.commit(root, tmp, 10, {"trainer": {"step": 10}}, 2)
    (ckpt / "buffer" / "segment-000000000000.arrow").write_bytes(b"rot!")
    checkpoint.verify(ckpt)
    (ckpt / "buffer" / "manifest.json").write_text("[]")
    with pytest.raises(checkpoint.CheckpointError, match=r"manifest.json differs from its checksum"):
        checkpoint.verify(ckpt)


def test_a_pickle_that_runs_code_is_refused_even_with_valid_checksums(tmp_path):
    """Whoever can write a checkpoint can also reseal it; ammd's own files still load with
    weights_only=True, so a crafted ZeRO-0 model state is refused, its payload never run."""
    import pickle

    import torch

    from cluster.export import _state_dict
    from learner.learner_actor import CHECKPOINT_TAG

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    ckpt = tmp_path / "ckpt"
    (ckpt / "deepspeed" / CHECKPOINT_TAG).mkdir(parents=True)
    with open(ckpt / "deepspeed" / CHECKPOINT_TAG / "mp_rank_00_model_states.pt", "wb") as f:
        pickle.dump({"module": Payload()}, f)
    with pytest.raises(checkpoint.CheckpointError, match=r"not only tensors and plain values"):
        _state_dict(ckpt, zero_stage=0)
    assert not marker.exists()
    torch.save({"module": {"w": torch.ones(2)}}, ckpt / "deepspeed" / CHECKPOINT_TAG / "mp_rank_00_model_states.pt")
    assert torch.equal(_state_dict(ckpt, zero_stage=0)["w"], torch.ones(2))
