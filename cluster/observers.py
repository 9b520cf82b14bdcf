"""The job's standing observers (``cluster.job_state.JobObserver``): the status endpoint, the
trackers and the progress display. The driver tells them, in this order, of every phase and
every learner step; a benchmark adds its own probe beside them (``run_job(observers=...)``).
"""
from __future__ import annotations

from typing import Any

from cluster import logs, tracking
from cluster.job_state import JobObserver
from services.status import JobStatus

STATUS_STATES = ("evaluating", "training", "finished", "failed")  # the phases /status shows


class StatusObserver(JobObserver):
    """Publishes what ``/status``, ``/metrics`` and the page read, once per learner step: the
    new steps' losses, liveness from the actors' pings, buffer fill, throughput, the weight
    pushes, the evaluations."""

    def __init__(self, status: JobStatus):
        self.status = status
        self.recorded = 0  # history records handed to the status (a resumed job's earlier ones too)

    def phase(self, job: Any, name: str) -> None:
        self._record_losses(job)
        if name in STATUS_STATES:
            self.status.update(state=name)

    def stepped(self, job: Any) -> None:
        state, pump, supervisor = job.trainer.state, job.pump, job.supervisor
        self._record_losses(job)
        supervisor.probe()  # liveness from real answers: every actor is pinged, its answer timed
        buffer = job.trainer.waiter.wait(job.trainer.actors.buffer.stats.remote(), "the replay buffer")
        rollout_tps, learner_tps = pump.tokens_per_s(), state.learner_tokens_per_s()
        push = job.trainer.weight_push
        self.status.update(actors=_with_actor_rates(supervisor.health(), pump.actor_tokens_per_s()),
                           step=state.step, weight_version=push.version, evals=state.evals,
                           buffer=buffer, rollout_usage=pump.usage(buffer["served_by_source"]),
                           restarts=supervisor.restart_counts(), rollout_tokens_per_s=rollout_tps,
                           learner_tokens_per_s=learner_tps, weight_pushes=push.pushes,
                           weight_push_seconds=push.seconds, sampled_age=state.sampled_age)
        self.status.record_throughput(state.step, learner_tps, rollout_tps)

    def _record_losses(self, job: Any) -> None:
        for record in job.trainer.state.history[self.recorded:]:
            self.status.record_loss(record["step"], {k: v for k, v in record.items() if k != "step"})
        self.recorded = len(job.trainer.state.history)


class TrackerObserver(JobObserver):
    """Hands TensorBoard and W&B (``cluster.tracking``) each new step's record, exactly
    report.json's, and the status just published (what ``/metrics`` serves) at that step."""

    def __init__(self, trackers: tracking.Trackers, status: JobStatus):
        self.trackers, self.status = trackers, status
        self.logged: int | None = None  # records tracked; None until the loop starts

    def phase(self, job: Any, name: str) -> None:
        if name == "training":  # a resumed job's earlier steps were tracked by tracking.start
            self.logged = len(job.trainer.state.history)

    def stepped(self, job: Any) -> None:
        state = job.trainer.state
        new = state.history[self.logged:]
        for record in new:
            self.trackers.log_step(record)
        if new:  # a skipped (non-finite) step changes nothing worth a second point at this step
            self.trackers.log_snapshot(state.step, self.status.view())
        self.logged = len(state.history)


class ProgressObserver(JobObserver):
    """The progress bar (or the plain 5% lines) over the learner steps, with loss and tok/s."""

    def __init__(self) -> None:
        self.shown: logs.Progress | None = None

    def phase(self, job: Any, name: str) -> None:
        if name == "training":
            self.shown = logs.progress(job.trainer.cfg.learner.steps, start=job.trainer.state.step)
        elif name in ("trained", "failed") and self.shown is not None:
            self.shown.close()
            self.shown = None

    def stepped(self, job: Any) -> None:
        state, pump = job.trainer.state, job.pump
        last = state.history[-1] if state.history else {}
        self.shown.update(state.step, {"loss": last.get("loss", float("nan")), "lr": last.get("lr", float("nan")),
                                       "version": job.trainer.version, "rollout_tps": pump.tokens_per_s(),
                                       "learner_tps": state.learner_tokens_per_s(), "rows": pump.rows})


def _with_actor_rates(health: dict[str, dict], rates: dict[str, float]) -> dict[str, dict]:
    """``health`` with ``tokens_per_s`` on every student and teacher (0.0 until its first rows)."""
    for name, info in health.items():
        if info.get("kind") in ("student", "teacher"):
            info["tokens_per_s"] = rates.get(name, 0.0)
    return health
