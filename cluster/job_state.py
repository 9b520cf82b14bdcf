"""The job's state, one object, and the interface of whatever watches it.

``JobState`` is what the job knows of its progress: the learner step, every step's metrics,
tokens trained, the evaluations and scores, the newest checkpoint. The trainer and the driver
write it; a checkpoint saves it and a resume restores it; the report, ``/status``, the trackers
and the benchmark's probe read it. They read it through ``JobObserver``: the driver's loop tells
every observer of each phase of the job and of each learner step, and never calls one of them
by name, so a new reader is a new observer, not a new line in the loop.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional


@dataclass
class JobState:
    step: int = 0                                   # learner steps taken
    history: list[dict[str, float]] = field(default_factory=list)  # one record per step
    tokens: int = 0                                 # response tokens trained on, all ranks
    train_seconds: float = 0.0                      # time inside the ranks' train_step calls
    max_lag: int = 0                                # the most versions an on-policy row lagged
    sampled_age: Optional[dict[str, float]] = None  # the last batch's on-policy rows: mean, max lag
    evals: list[dict] = field(default_factory=list)  # {"step", "weight_version", "score"}
    scores: dict[str, float] = field(default_factory=dict)  # teacher and student-before scores
    last_checkpoint: Optional[Path] = None
    # When this process finished its first learner step (time.time()). Not saved: a resumed job
    # has a start-up of its own, and the report's seconds_to_first_step is this process's.
    first_step_at: Optional[float] = None

    def record_step(self, metrics: dict[str, float], tokens: int) -> None:
        """One more learner step with these (rank-averaged) metrics and trained tokens."""
        if self.first_step_at is None:
            self.first_step_at = time.time()
        self.step += 1
        self.tokens += tokens
        self.history.append({"step": self.step, **metrics})

    def note_lag(self, ages: list[int]) -> None:
        """The weight versions the batch's on-policy rows lag behind (empty: none in it)."""
        self.sampled_age = {"mean": sum(ages) / len(ages), "max": max(ages)} if ages else None
        if ages:
            self.max_lag = max(self.max_lag, max(ages))

    def learner_tokens_per_s(self) -> float:
        return self.tokens / max(self.train_seconds, 1e-9)

    def saved(self, version: int) -> dict[str, Any]:
        """What a checkpoint keeps of it (``driver.json``'s "trainer" section)."""
        return {"step": self.step, "version": version, "history": self.history, "tokens": self.tokens,
                "train_seconds": self.train_seconds, "max_lag": self.max_lag, "evals": self.evals,
                "scores": self.scores}

    def restore(self, saved: dict[str, Any], checkpoint: Path) -> int:
        """Take back what ``saved`` wrote; returns the weight version it held."""
        self.step, self.history, self.tokens = saved["step"], saved["history"], saved["tokens"]
        self.train_seconds, self.max_lag = saved["train_seconds"], saved["max_lag"]
        self.evals, self.scores, self.last_checkpoint = saved["evals"], saved["scores"], checkpoint
        return saved["version"]


class JobObserver:
    """Watches a running job. ``job`` is the driver's ``Job`` (its inputs, trainer, rollout pump
    and supervisor; ``job.trainer.state`` is the ``JobState``). Phases, in order: "evaluating"
    (the scores before, a new job only), "training" (the loop starts), "trained" (the loop has
    ended: every step taken and its weights pushed), "finished", or "failed" at any point.
    Every method does nothing unless a subclass says otherwise."""

    def phase(self, job: Any, name: str) -> None:
        """The job entered phase ``name``."""

    def stepped(self, job: Any) -> None:
        """A learner step is done, with its push, evaluation and checkpoint when due."""


class Observers(JobObserver):
    """Several observers as one, told in the order given."""

    def __init__(self, observers: Iterable[JobObserver]):
        self.observers = list(observers)

    def phase(self, job: Any, name: str) -> None:
        for o in self.observers:
            o.phase(job, name)

    def stepped(self, job: Any) -> None:
        for o in self.observers:
            o.stepped(job)
