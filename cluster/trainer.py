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
from typing import Callable

import numpy as np
import ray

from cluster import checkpoint, logs
from cluster.actors import Actors
from cluster.config import JobConfig
from cluster.job_state import JobState
from cluster.rollouts import Demand
from cluster.waiting import Waiter
from cluster.weight_push import Pushed, weight_push_for

MAX_NONFINITE_STEPS = 3


class Trainer:
    """Steps the learner group, pushes its weights and saves checkpoints; what the job has done
    so far is ``state`` (``cluster.job_state.JobState``), the one object every reader reads."""

    def __init__(self, cfg: JobConfig, actors: Actors, run_dir: Path,
                 resume_hint: str = "ammd run CONFIG --resume", log: Callable[[str], None] = logs.info):
        self.cfg, self.actors, self.run_dir = cfg, actors, run_dir
        self.resume_hint, self.log = resume_hint, log
        self.state = JobState()
        self.nonfinite_in_a_row = 0
        self.global_batch = cfg.learner.micro_batch * cfg.learner.actors
        self.n_on = int(round(self.global_batch * cfg.buffer.on_policy_fraction))
        self.waiter = Waiter(cfg.ray.actor_timeout_s, self.how_to_resume)
        self.weight_push = weight_push_for(cfg, actors, self.waiter, lambda: self.state.step, log)

    def how_to_resume(self) -> str:
        """What every lost-actor error ends with: the checkpoint and command that continue the job."""
        if self.state.last_checkpoint is None:
            return "No checkpoint was written yet (learner.save_every); the job must start over."
        return (f"The last complete checkpoint is {self.state.last_checkpoint}; continue with: "
                f"{self.resume_hint}")

    # -- training -------------------------------------------------------------------------------
    @property
    def min_version(self) -> int:
        return self.version - self.cfg.buffer.max_staleness

    def demand(self) -> Demand:
        """What the remaining steps will train on. A student row sampled now carries version v
        and stays usable until the push of v + max_staleness + 1: ``window`` more steps."""
        b, lc = self.cfg.buffer, self.cfg.learner
        step = self.state.step
        window = (b.max_staleness + 1) * lc.sync_every - step % lc.sync_every
        return Demand(self.n_on, self.global_batch - self.n_on, lc.steps - step, window,
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
        self.state.train_seconds += time.time() - t0
        if any(r["skipped_nonfinite"] for r in results):
            self.nonfinite_in_a_row += 1
            self.log(f"step {self.state.step + 1}: non-finite loss, step skipped on every rank")
            if self.nonfinite_in_a_row >= MAX_NONFINITE_STEPS:
                raise FloatingPointError(f"loss was NaN/inf for {MAX_NONFINITE_STEPS} steps in a row; "
                                         f"lower learner.lr or check the teacher signal")
            return True
        self.nonfinite_in_a_row = 0
        keys = set().union(*results) - {"tokens", "seconds", "skipped_nonfinite"}
        merged = {k: float(np.mean([r[k] for r in results if k in r])) for k in sorted(keys)}
        self.state.record_step(merged, int(sum(r["tokens"] for r in results)))
        return True

    def _note_lag(self, table) -> None:
        """How many weight versions the batch's on-policy rows lag behind (JobState.note_lag)."""
        self.state.note_lag([self.version - v for v, s in zip(table.column("policy_version").to_pylist(),
                                                              table.column("source").to_pylist())
                             if s == "student"])

    # -- the weights the students hold (cluster.weight_push) ----------------------------------
    @property
    def version(self) -> int:
        """The weight version the students hold (0 from the first push; a resume restores it)."""
        return self.weight_push.version

    @property
    def pushed_at(self) -> int:
        """The learner step whose weights the students hold (-1 before the first push)."""
        return self.weight_push.pushed_at

    def push_weights(self, version: int | None = None) -> Pushed:
        """Send the learner's current weights to every student as ``version`` (default: the
        next) and wait as the transport needs; see ``WeightPush.push``."""
        return self.weight_push.push(version)

    # -- the student out, checkpoints in and out ---------------------------------------------
    def export_student(self, out_dir: Path) -> Path:
        """Write the student as a HF model directory (every rank takes part in the gather)."""
        lc, dtype = self.cfg.learner, self.cfg.rollout.dtype
        self.waiter.wait([l.export_student.remote(str(out_dir), self.cfg.models.student, dtype, lc.bucket_mib)
                          for l in self.actors.learners], self.actors.learner_names())
        return out_dir

    def save(self, pump_state: dict, extra: dict) -> Path:
        """A complete checkpoint (see cluster.checkpoint); the caller has drained the rollouts."""
        root, step = checkpoint.checkpoints_root(self.run_dir), self.state.step
        tmp = checkpoint.begin(root, step)
        self.waiter.wait([l.save.remote(str(tmp), {"step": step}) for l in self.actors.learners],
                         self.actors.learner_names())
        self.export_student(tmp / "student")
        self.waiter.wait(self.actors.buffer.snapshot.remote(str(tmp / "buffer")), "the replay buffer")
        saved = {"trainer": self.state.saved(self.version), "pump": pump_state, **extra}
        self.state.last_checkpoint = checkpoint.commit(root, tmp, step, saved, self.cfg.learner.keep_checkpoints)
        self.log(f"checkpoint {self.state.last_checkpoint}")
        return self.state.last_checkpoint

    def restore(self, path: Path, saved: dict) -> None:
        """Load every rank's state from checkpoint ``path`` and the driver's own from ``saved``."""
        self.waiter.wait([l.load.remote(str(path)) for l in self.actors.learners],
                         self.actors.learner_names())
        self.weight_push.version = self.state.restore(saved["trainer"], path)
