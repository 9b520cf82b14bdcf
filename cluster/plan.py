"""What a job asks of its cluster, worked out from the config alone (``ammd check`` prints it).

Every actor kind holds a fixed amount: a learner rank one GPU on ``learner.device=cuda`` (none
on CPU), a rollout actor ``rollout.<kind>.gpus``, the buffer nothing. Summing them tells a user
before the job starts whether the recipe fits the nodes they have, instead of a placement
group that waits forever.
"""
from __future__ import annotations

from dataclasses import dataclass

from cluster.config import JobConfig


@dataclass(frozen=True)
class Demand:
    """Actors of one kind and what each one asks Ray for."""

    kind: str
    actors: int
    gpus_each: float
    cpus_each: float

    @property
    def gpus(self) -> float:
        return self.actors * self.gpus_each


def resource_plan(cfg: JobConfig) -> list[Demand]:
    """The job's actors by kind (learner, student and teacher rollout actors)."""
    r = cfg.rollout
    return [Demand("learner", cfg.learner.actors, 1.0 if cfg.learner.device == "cuda" else 0.0, 1.0),
            Demand("student", r.student_actors, r.student.gpus, 1.0),
            Demand("teacher", r.teacher_actors, r.teacher.gpus, 1.0)]


def describe_plan(cfg: JobConfig) -> str:
    """One line per actor kind and the totals, e.g. for ``ammd check``."""
    plan = resource_plan(cfg)
    lines = [f"  {d.kind}: {d.actors} x ({d.gpus_each:g} GPU, {d.cpus_each:g} CPU)" for d in plan]
    lines.append(f"  total: {sum(d.gpus for d in plan):g} GPUs, "
                 f"{sum(d.actors * d.cpus_each for d in plan):g} CPUs (+ the buffer and the driver)")
    engine = "CUDA" if any(d.gpus_each > 0 for d in plan[1:]) else "CPU"
    eager = cfg.rollout.enforce_eager
    lines.append(f"  rollout engines on {engine}, "
                 f"{'eager' if eager or (eager is None and engine == 'CPU') else 'CUDA graphs'}; "
                 f"learner on {cfg.learner.device} ({cfg.learner.precision}, ZeRO-{cfg.learner.zero_stage})")
    return "\n".join(lines)
