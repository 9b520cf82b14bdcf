"""Learning-rate schedules, built from torch's own schedulers.

With peak rate ``lr``, ``warmup`` steps and ``steps`` in all, the rate used by optimiser
step t (0-based) is

  warm-up (t < warmup):  lr * (t + 1) / (warmup + 1)
  then, with u = (t - warmup) / (steps - warmup) in [0, 1):
    constant:  lr
    linear:    min_lr + (lr - min_lr) * (1 - u)
    cosine:    min_lr + (lr - min_lr) * (1 + cos(pi u)) / 2

so the last step's rate is close to ``min_lr`` (0 by default): the final weights are an
average over small steps rather than whatever the last noisy full-size step left. This is
what every Hugging Face trainer (TRL's included) does by default with ``linear``.

The scheduler is stepped once per optimiser step (DeepSpeed does it inside
``engine.step()``, and skips it with the step when the loss was not finite), and its state is
saved with the optimiser's.
"""
from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import (ConstantLR, CosineAnnealingLR, LinearLR, LRScheduler,
                                      SequentialLR)

SCHEDULES = ("constant", "linear", "cosine")


def warmup_steps(steps: int, warmup_steps: int = 0, warmup_ratio: float = 0.0) -> int:
    """Warm-up length in steps: ``warmup_steps`` if set, else ``warmup_ratio`` of ``steps``."""
    n = warmup_steps if warmup_steps else int(round(warmup_ratio * steps))
    return min(n, max(steps - 1, 0))


def make_lr_scheduler(optimizer: Optimizer, schedule: str, steps: int, warmup: int = 0,
                      min_lr: float = 0.0) -> LRScheduler:
    """A torch scheduler for ``optimizer`` (its param groups' ``lr`` is the peak rate)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; choose one of {SCHEDULES}")
    peak = optimizer.param_groups[0]["lr"]
    if not 0 <= min_lr <= peak:
        raise ValueError(f"min_lr={min_lr} must lie in [0, lr={peak}]")
    decay_steps = max(steps - warmup, 1)
    if schedule == "constant":
        main: LRScheduler = ConstantLR(optimizer, factor=1.0, total_iters=0)
    elif schedule == "linear":
        main = LinearLR(optimizer, start_factor=1.0, end_factor=min_lr / peak, total_iters=decay_steps)
    else:
        main = CosineAnnealingLR(optimizer, T_max=decay_steps, eta_min=min_lr)
    if warmup == 0:
        return main
    ramp = LinearLR(optimizer, start_factor=1.0 / (warmup + 1), end_factor=1.0, total_iters=warmup)
    return SequentialLR(optimizer, [ramp, main], milestones=[warmup])
