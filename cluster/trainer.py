"""The learner side of the job: sampling batches, stepping every rank, pushing weights, saving.

Every call that touches the learner group is made on all ranks at once, and every wait on an
actor is bounded by ``ray.actor_timeout_s``: an actor that dies or stops answering fails the
job with a message that names it and says how to resume (``ActorLostError``).
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
from cluster.errors import first_line
from cluster.rollouts import Demand
from cluster.supervisor import ActorLostError
from services.status import JobStatus

MAX_NONFINITE_STEPS = 3


class Trainer:
    def __init__(self, cfg: JobConfig, actors: Actors, status: JobStatus, run_dir: Path,
                 resume_hint: str = "ammd run CONFIG --resume", log: Callable[[str], None] = logs.info):
        self.cfg, self.actors, self.status, self.run_dir = cfg, actors, status, run_dir
        self.resume_hint, self.log = resume_hint, log
        self.version = 0
        self.payload = None  # the newest weights (rank 0's buckets), for restarted students
        self._members: list | None = None  # the students in the collective transport's side band
        self.pushed_at = -1  # the learner step whose weights the students hold
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.tokens = 0
        self.train_seconds = 0.0
        self.nonfinite_in_a_row = 0
        self.max_lag = 0
        self.sampled_age: dict[str, float] | None = None  # the last batch's on-policy rows (status)
        self.weight_pushes = 0
        self.weight_push_seconds: float | None = None  # the last push, as the driver waited on it
        self.evals: list[dict] = []
        self.scores: dict[str, float] = {}  # teacher and student-before scores, kept across a resume
        self.last_checkpoint: Path | None = None
        self.global_batch = cfg.learner.micro_batch * cfg.learner.actors
        self.n_on = int(round(self.global_batch * cfg.buffer.on_policy_fraction))

    # -- waiting on actors ----------------------------------------------------------------------
    def wait(self, refs: Any, who: str | list[str]) -> Any:
        """``ray.get`` bounded by ray.actor_timeout_s; a lost actor becomes one clear error.

        ``refs`` is one ref or a list; ``who`` names the actor (or one per ref). The first
        failure raises at once: a rank that died must not leave the driver waiting on the
        ranks stuck in a collective with it.
        """
        timeout, many = self.cfg.ray.actor_timeout_s, isinstance(refs, list)
        names = who if isinstance(who, list) else [who] * (len(refs) if many else 1)
        pending = list(refs) if many else [refs]
        index = {ref: i for i, ref in enumerate(pending)}
        deadline = time.time() + timeout
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.time()))
            if not done:
                silent = sorted({names[index[r]] for r in pending})
                raise ActorLostError(f"{', '.join(silent)} did not answer within ray.actor_timeout_s="
                                     f"{timeout:.0f} s. {self.how_to_resume()}")
            try:
                ray.get(done[0])
            except ray.exceptions.RayActorError as err:
                raise ActorLostError(f"{names[index[done[0]]]} died ({first_line(err)}). "
                                     f"{self.how_to_resume()}") from None
        return ray.get(refs)

    def learner_names(self) -> list[str]:
        return [f"learner-{i}" for i in range(len(self.actors.learners))]

    def how_to_resume(self) -> str:
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
        table = self.wait(self.actors.buffer.sample.remote(
            self.global_batch, self.cfg.buffer.on_policy_fraction, self.min_version), "the replay buffer")
        if table is None:
            return False
        self._note_lag(table)
        t0 = time.time()
        ref = ray.put(table)
        results = self.wait([l.train_step.remote(ref) for l in self.actors.learners], self.learner_names())
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

    def push_weights(self, version: int | None = None) -> None:
        """Send the learner's current weights to every student as ``version`` (default: the next).

        object_store: rank 0 packs the buckets (all ranks enter, for ZeRO-3), this waits until
        they are stored, and the students' loads are queued; a student actor runs its calls in
        order, so anything asked of it after this sees the new weights. collective: rank 0 broadcasts on the side-band group while the
        students receive, and this returns when both are done (within ray.actor_timeout_s); if
        the side band fails, the group is dropped and this push goes through the object store.
        Sets ``weight_push_seconds`` (this call's wall time) and counts ``weight_pushes``.
        """
        version = self.version + 1 if version is None else version
        t0 = time.perf_counter()
        if self.cfg.learner.weight_transport != "collective" or not self._push_collective(version):
            self._push_object_store(version, self.actors.students)
            # Until rank 0's buckets are stored (not fetched here): the learner's side of the
            # push, which its next step waits behind anyway; the students load it in the background.
            ray.wait([self.payload], timeout=self.cfg.ray.actor_timeout_s, fetch_local=False)
        self.weight_push_seconds = time.perf_counter() - t0
        self.weight_pushes += 1
        self.version, self.pushed_at = version, self.step

    def _push_object_store(self, version: int, students: list) -> None:
        lc = self.cfg.learner
        refs = [l.export_weights.remote("object_store", lc.bucket_mib, self.cfg.rollout.dtype)
                for l in self.actors.learners]
        self.wait(refs[1:], self.learner_names()[1:])  # the other ranks only took part in the gather
        self.payload = refs[0]  # rank 0's buckets; Ray hands them to the students without the driver
        for student in students:
            student.load_weights.remote(self.payload, version)

    def _push_collective(self, version: int) -> bool:
        """One push over the side band, forming the group first if its members changed (a new
        job, a restarted student). False if it failed: the caller falls back."""
        lc, students = self.cfg.learner, list(self.actors.students)
        errors = [] if self._members == students else self._form_group(students)
        if not errors:
            refs = [l.export_weights.remote("collective", lc.bucket_mib, self.cfg.rollout.dtype)
                    for l in self.actors.learners]
            receives = [s.receive_weights.remote(version) for s in students]
            errors = self._side_band(refs, self.learner_names(), receives)
        if errors:
            self.log(f"collective weight push of version {version} failed ({'; '.join(errors)}); "
                     f"it goes through the object store, and the next push forms the group again")
            self._members = None
            self.wait(self.actors.learners[0].close_weight_group.remote(), "learner-0")
            return False
        self.payload = None  # nothing is kept: a restarted student gets a fresh export (weights())
        return True

    def _form_group(self, students: list) -> list[str]:
        """A new side-band group: learner rank 0 hosts a new store, everyone joins it at once."""
        rank0, timeout = self.actors.learners[0], self.side_band_timeout_s
        address = self.wait(rank0.open_weight_store.remote(timeout), "learner-0")
        size = len(students) + 1
        backend = "nccl" if self.cfg.learner.device == "cuda" else "gloo"
        joins = [s.join_weight_group.remote(address, i + 1, size, backend, timeout)
                 for i, s in enumerate(students)]
        errors = self._side_band([rank0.join_weight_group.remote(size, timeout)], ["learner-0"], joins)
        self._members = None if errors else students
        return errors

    @property
    def side_band_timeout_s(self) -> float:
        """The side band's own timeout: half of ray.actor_timeout_s, so that a student that
        hangs fails the side band (which falls back) well before the learner wait gives up."""
        return self.cfg.ray.actor_timeout_s / 2

    def _side_band(self, learner_refs: list, names: list[str], student_refs: list) -> list[str]:
        """Wait for one side-band step; returns what went wrong (empty: all well).

        A lost or silent learner rank fails the job (``wait``); a student's failure is only
        reported: the caller falls back to the object store, and the supervisor restarts a
        student that is gone when its next request fails.
        """
        deadline = time.time() + self.cfg.ray.actor_timeout_s
        results = self.wait(learner_refs, names)
        errors = [r.get("error") if isinstance(r, dict) else r for r in results]
        errors = [e for e in errors if e]
        for i, ref in enumerate(student_refs):
            try:
                ray.get(ref, timeout=max(0.0, deadline - time.time()))
            except ray.exceptions.RayError as err:
                errors.append(f"student-{i}: {first_line(err)}")
        return errors

    def weights(self) -> tuple[Any, int]:
        """What a restarted student loads first: an object-store payload and its version.

        After an object-store push that is the push's own payload. The collective transport
        keeps no copy, so the learner's weights go through the object store now: under the same
        version when the learner has not stepped since the last push, else as a new version
        that every student loads (a version names one set of weights). The next collective push
        forms the group again, with the restarted student in it (cluster.supervisor).
        """
        if self.payload is None:
            same = self.step == self.pushed_at
            version = self.version if same else self.version + 1
            self._push_object_store(version, [] if same else self.actors.students)
            self.version, self.pushed_at = version, self.step
        return self.payload, self.version

    def learner_tokens_per_s(self) -> float:
        return self.tokens / max(self.train_seconds, 1e-9)

    # -- the student out, checkpoints in and out ---------------------------------------------
    def export_student(self, out_dir: Path) -> Path:
        """Write the student as a HF model directory (every rank takes part in the gather)."""
        lc = self.cfg.learner
        self.wait([l.export_student.remote(str(out_dir), self.cfg.models.student, self.cfg.rollout.dtype,
                                           lc.bucket_mib) for l in self.actors.learners], self.learner_names())
        return out_dir

    def save(self, pump_state: dict, extra: dict) -> Path:
        """A complete checkpoint (see cluster.checkpoint); the caller has drained the rollouts."""
        root = checkpoint.checkpoints_root(self.run_dir)
        tmp = checkpoint.begin(root, self.step)
        self.wait([l.save.remote(str(tmp), {"step": self.step}) for l in self.actors.learners], self.learner_names())
        self.export_student(tmp / "student")
        self.wait(self.actors.buffer.snapshot.remote(str(tmp / "buffer")), "the replay buffer")
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
        self.wait([l.load.remote(str(path)) for l in self.actors.learners], self.learner_names())
        t = state["trainer"]
        self.step, self.version, self.history = t["step"], t["version"], t["history"]
        self.tokens, self.train_seconds, self.max_lag = t["tokens"], t["train_seconds"], t["max_lag"]
        self.evals, self.scores = t["evals"], t["scores"]
        self.last_checkpoint = path
        for h in self.history:
            self.status.record_loss(h["step"], {k: v for k, v in h.items() if k != "step"})
