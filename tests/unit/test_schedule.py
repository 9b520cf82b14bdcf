"""Learning-rate schedules against a float64 closed form (learner/schedule.py states it)."""
import math

import pytest
import torch

from learner.schedule import make_lr_scheduler, warmup_steps


def closed_form(schedule: str, t: int, steps: int, warmup: int, lr: float, min_lr: float) -> float:
    if t < warmup:
        return lr * (t + 1) / (warmup + 1)
    u = (t - warmup) / (steps - warmup)
    if schedule == "constant":
        return lr
    if schedule == "linear":
        return min_lr + (lr - min_lr) * (1 - u)
    return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * u)) / 2


def rates(schedule: str, steps: int, warmup: int, lr: float, min_lr: float) -> list[float]:
    """The rate each optimiser step used, stepping the scheduler as DeepSpeed does."""
    param = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([param], lr=lr)
    sched = make_lr_scheduler(opt, schedule, steps, warmup, min_lr)
    used = []
    for _ in range(steps):
        used.append(opt.param_groups[0]["lr"])
        param.grad = torch.ones(3)
        opt.step()
        sched.step()
    return used


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("warmup,min_lr", [(0, 0.0), (7, 1e-5), (1, 3e-4)])
def test_every_step_uses_the_closed_form_rate(schedule, warmup, min_lr):
    steps, lr = 40, 1e-3
    got = rates(schedule, steps, warmup, lr, min_lr)
    want = [closed_form(schedule, t, steps, warmup, lr, min_lr) for t in range(steps)]
    assert got == pytest.approx(want, rel=1e-9, abs=1e-15)
    if schedule != "constant":  # a decay ends one step short of min_lr, and never below it
        assert min(got) >= min_lr and got[-1] == pytest.approx(min_lr + (lr - min_lr) * (
            1 / (steps - warmup) if schedule == "linear" else (1 + math.cos(math.pi * (1 - 1 / (steps - warmup)))) / 2))


def test_scheduler_state_round_trips():
    # What a checkpoint saves: a fresh scheduler loaded from the state continues the same rates.
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=1e-3)
    sched = make_lr_scheduler(opt, "cosine", 20, 3)
    for _ in range(8):
        opt.step()
        sched.step()
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched2 = make_lr_scheduler(opt2, "cosine", 20, 3)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    assert opt2.param_groups[0]["lr"] == pytest.approx(closed_form("cosine", 8, 20, 3, 1e-3, 0.0))


def test_warmup_steps_and_bad_settings():
    assert warmup_steps(100, 0, 0.1) == 10 and warmup_steps(100, 5, 0.1) == 5
    assert warmup_steps(10, 50) == 9  # at least one step is left to decay
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    with pytest.raises(ValueError, match="schedule"):
        make_lr_scheduler(opt, "step", 10)
    with pytest.raises(ValueError, match="min_lr"):
        make_lr_scheduler(opt, "linear", 10, min_lr=1e-2)


def test_config_refuses_a_floor_above_the_peak():
    from cluster.config import ConfigError, build_config
    with pytest.raises(ConfigError, match="min_lr"):
        build_config({}, ["learner.lr=1e-4", "learner.min_lr=1e-3"])
    with pytest.raises(ConfigError, match="warmup_steps"):
        build_config({}, ["learner.steps=10", "learner.warmup_steps=10"])
    with pytest.raises(ConfigError, match="lr_schedule"):
        build_config({}, ["learner.lr_schedule=step"])
    assert build_config({}).learner.lr_schedule == "linear"
