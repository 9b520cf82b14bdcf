"""The learner's own collectives keep their tensors on the device of what they reduce.

NCCL (GPU) has no CPU collectives, and this machine has no GPU, so the tensors here live on
PyTorch's ``meta`` device: a collective handed a tensor built on the host would record "cpu".
``torch.distributed`` is replaced by a recorder (there is no second rank to reduce with).
"""
import pytest
import torch

import learner.collectives as col


class Recorded(Exception):
    pass


@pytest.fixture
def recorder(monkeypatch):
    seen = []

    def all_reduce(t, op=None):
        seen.append(t.device)
        if t.device.type == "meta":
            raise Recorded  # nothing to reduce on meta; the device is what is checked
        t.mul_(1)

    monkeypatch.setattr(col, "_grouped", lambda: True)
    monkeypatch.setattr(col.dist, "all_reduce", all_reduce)
    monkeypatch.setattr(col.dist, "get_world_size", lambda: 2)
    return seen


def test_finite_flag_is_reduced_on_the_loss_device(recorder):
    with pytest.raises(Recorded):
        col.all_ranks_finite(torch.empty((), device="meta"))
    assert recorder == [torch.device("meta")]


def test_gradients_are_averaged_on_their_device(recorder):
    grads = [torch.empty(3, 2, device="meta"), torch.empty(4, device="meta")]
    with pytest.raises(Recorded):
        col.average_over_ranks(grads)
    assert recorder == [torch.device("meta")]


def test_finite_flag_values(recorder):
    assert col.all_ranks_finite(torch.tensor(1.5)) is True
    assert col.all_ranks_finite(torch.tensor(float("nan"))) is False
    assert col.all_ranks_finite(torch.tensor(float("-inf"))) is False


def test_average_divides_by_world_size(recorder):
    # The recorder's all-reduce is the identity (one rank's contribution), so the mean halves it.
    grads = [torch.tensor([[2.0, 4.0]], dtype=torch.float64), torch.tensor([6.0], dtype=torch.float64)]
    col.average_over_ranks(grads)
    assert grads[0].tolist() == [[1.0, 2.0]] and grads[1].tolist() == [3.0]


def test_no_raw_collectives_in_the_learner_group():
    """Every collective of the learner group outside DeepSpeed goes through learner.collectives
    (the weight push's own group, learner to rollout actors, is weight_sync's business)."""
    import pathlib
    root = pathlib.Path(col.__file__).parent
    group_files = ("learner_actor.py", "objective.py", "amm.py", "losses.py", "batch.py", "student_dir.py")
    offenders = [name for name in group_files if any(
        f"dist.{op}(" in (root / name).read_text() for op in ("all_reduce", "all_gather", "broadcast", "reduce_scatter"))]
    assert offenders == []


def test_one_backend_per_device_for_every_group():
    """DeepSpeed's group and the weight push's side band pick their backend in one place."""
    assert col.collective_backend("cuda") == "nccl" and col.collective_backend("cpu") == "gloo"
