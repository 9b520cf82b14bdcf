"""The learner side of the job: sampling batches, stepping every rank, pushing weights, saving.

Every call that touches the learner group is made on all ranks at once, and every wait on an
actor is bounded by ``ray.actor_timeout_s`` (``cluster.waiting``): an actor that dies or stops
answering fails the job with a message that names it and says how to resume
(``ActorLostError``). The weights reach the students through the job's ``WeightPush``
(``cluster.weight_push``), which also holds the weight version they have.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import ray

from cluster import checkpoint, logs
from cluster.actors import Actors
from cluster.config import JobConfig
from cluster.rollouts import Demand
from cluster.waiting import Waiter
from cluster.weight_push import Pushed, weight_push_for
from services.status import JobStatus

MAX_NONFINITE_STEPS = 3


class Trainer:
    def __init__(self, cfg: JobConfig, actors: Actors, status: JobStatus, run_dir: Path,
                 resume_hint: str = "ammd run CONFIG --resume", log: Callable[[str], None] = logs.info):
        self.cfg, self.actors, self.status, self.run_dir = cfg, actors, status, run_dir
        self.resume_hint, self.log = resume_hint, log
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.tokens = 0
        self.train_seconds = 0.0
        self.nonfinite_in_a_row = 0
        self.max_lag = 0
        self.sampled_age: dict[str, float] | None = None  # the last batch's on-policy rows (status)
        self.evals: list[dict] = []
        self.scores: dict[str, float] = {}  # teacher and student-before scores, kept across a resume
        self.last_checkpoint: Path | None = None
        self.global_batch = cfg.learner.micro_batch * cfg.learner.actors
        self.n_on = int(round(self.global_batch * cfg.buffer.on_policy_fraction))
        self.waiter = Waiter(cfg.ray.actor_timeout_s, self.how_to_resume)
        self.weight_push = weight_push_for(cfg, actors, self.waiter, lambda: self.step, log)

    def how_to_resume(self) -> str:
        """What every lost-actor error ends with: the checkpoint and command that continue the job."""
        if self.last_checkpoint is None:
            return "No checkpoint was written yet (learner.save_every); the job must start over."
        return (f"The last complete checkpoint is {self.last_checkpoint}; continue with: "
                f"{self.resume_hint}")

    # -- training -------------------------------------------------------------------------------
    @property
    def min_version(self) -> int:
        return self.version - self.cfg.buffer.max_staleness

    def demand(self) -> Demand:
        """What the remaining steps will train on. A student row sampled now carries version v
        and stays usable until the push of v + max_staleness + 1: ``window`` more steps."""
        b, lc = self.cfg.buffer, self.cfg.learner
        window = (b.max_staleness + 1) * lc.sync_every - self.step % lc.sync_every
        return Demand(self.n_on, self.global_batch - self.n_on, lc.steps - self.step, window,
                      self.min_version, b.on_policy_uses, b.off_policy_uses)

    def try_step(self) -> bool:
        """One learner step if the buffer can serve a batch; False if it cannot yet."""
        table = self.waiter.wait(self.actors.buffer.sample.remote(
            self.global_batch, self.cfg.buffer.on_policy_fraction, self.min_version), "the replay buffer")
        if table is None:
            return False
        self._note_lag(table)
        t0 = time.time()
        ref = ray.put(table)
        results = self.waiter.wait([l.train_step.remote(ref) for l in self.actors.learners],
                                   self.actors.learner_names())
        self.train_seconds += time.time() - t0
        if any(r["skipped_nonfinite"] for r in results):
            self.nonfinite_in_a_row += 1
            self.log(f"step {self.step + 1}: non-finite loss, step skipped on every rank")
            if self.nonfinite_in_a_row >= MAX_NONFINITE_STEPS:
                raise FloatingPointError(f"loss was NaN/inf for {MAX_NONFINITE_STEPS} steps in a row; "
                                         f"lower learner.lr or check the teacher signal")
            return True
        self.nonfinite_in_a_row = 0
        self.step += 1
        self.tokens += int(sum(r["tokens"] for r in results))
        keys = set().union(*results) - {"tokens", "seconds", "skipped_nonfinite"}
        merged = {k: float(np.mean([r[k] for r in results if k in r])) for k in sorted(keys)}
        self.history.append({"step": self.step, **merged})
        self.status.record_loss(self.step, merged)
        return True

    def _note_lag(self, table) -> None:
        """Track how many weight versions the batch's on-policy rows lag behind: the job's
        worst (``max_lag``, for the report) and this batch's mean and max (``sampled_age``,
        None when the batch has no on-policy row)."""
        ages = [self.version - v for v, s in zip(table.column("policy_version").to_pylist(),
                                                 table.column("source").to_pylist()) if s == "student"]
        self.sampled_age = {"mean": sum(ages) / len(ages), "max": max(ages)} if ages else None
        if ages:
            self.max_lag = max(self.max_lag, max(ages))

    # -- the weights the students hold (cluster.weight_push) ----------------------------------
    @property
    def version(self) -> int:
        """The weight version the students hold (0 from the first push; a resume restores it)."""
        return self.weight_push.version

    @property
    def pushed_at(self) -> int:
        """The learner step whose weights the students hold (-1 before the first push)."""
        return self.weight_push.pushed_at

    @property
    def payload(self) -> Any:
        """The object-store payload the last push kept (None after a collective push), which
        bench.speed_push reads to tell a fallback."""
        return self.weight_push.payload

    def push_weights(self, version: int | None = None) -> Pushed:
        """Send the learner's current weights to every student as ``version`` (default: the
        next) and wait as the transport needs; see ``WeightPush.push``."""
        return self.weight_push.push(version)

    def learner_tokens_per_s(self) -> float:
        return self.tokens / max(self.train_seconds, 1e-9)

    # -- the student out, checkpoints in and out ---------------------------------------------
    def export_student(self, out_dir: Path) -> Path:
        """Write the student as a HF model directory (every rank takes part in the gather)."""
        lc, dtype = self.cfg.learner, self.cfg.rollout.dtype
        self.waiter.wait([l.export_student.remote(str(out_dir), self.cfg.models.student, dtype, lc.bucket_mib)
                          for l in self.actors.learners], self.actors.learner_names())
        return out_dir

    def save(self, pump_state: dict, extra: dict) -> Path:
        """A complete checkpoint (see cluster.checkpoint); the caller has drained the rollouts."""
        root = checkpoint.checkpoints_root(self.run_dir)
        tmp = checkpoint.begin(root, self.step)
        self.waiter.wait([l.save.remote(str(tmp), {"step": self.step}) for l in self.actors.learners],
                         self.actors.learner_names())
        self.export_student(tmp / "student")
        self.waiter.wait(self.actors.buffer.snapshot.remote(str(tmp / "buffer")), "the replay buffer")
        state = {"trainer": self.state(), "pump": pump_state, **extra}
        self.last_checkpoint = checkpoint.commit(root, tmp, self.step, state, self.cfg.learner.keep_checkpoints)
        self.log(f"checkpoint {self.last_checkpoint}")
        return self.last_checkpoint

    def state(self) -> dict:
        return {"step": self.step, "version": self.version, "history": self.history, "tokens": self.tokens,
                "train_seconds": self.train_seconds, "max_lag": self.max_lag, "evals": self.evals,
                "scores": self.scores}

    def restore(self, path: Path, state: dict) -> None:
        """Load every rank's state from checkpoint ``path`` and the driver's own from ``state``."""
        self.waiter.wait([l.load.remote(str(path)) for l in self.actors.learners],
                         self.actors.learner_names())
        t = state["trainer"]
        self.step, self.weight_push.version, self.history = t["step"], t["version"], t["history"]
        self.tokens, self.train_seconds, self.max_lag = t["tokens"], t["train_seconds"], t["max_lag"]
        self.evals, self.scores = t["evals"], t["scores"]
        self.last_checkpoint = path
        for h in self.history:
            self.status.record_loss(h["step"], {k: v for k, v in h.items() if k != "step"})
