"""The job: check inputs, start actors, train while rollouts flow, push weights, report.

Loop (one learner step per iteration):
  1. top up rollouts (cluster.rollouts) with what the learner will consume: no more rows than
     the remaining steps train on, and no on-policy row that would go stale before its turn;
  2. sample a batch: on_policy_fraction of it student rows at most max_staleness versions old;
     if the buffer cannot serve it yet, wait for a rollout and retry;
  3. every learner rank trains on its share of the batch (one DeepSpeed step);
  4. every sync_every steps: rank 0 packs the weights, the student actors load them as
     version v+1 (queued behind their current request; the driver does not wait).
After the last step the weights are pushed once more, so the final evaluation sees them, and
the student is written to ``<output_dir>/<name>/student`` as a Hugging Face model directory.
Every ``save_every`` steps (and after the last) a checkpoint is written whole
(cluster.checkpoint); ``resume=True`` continues from the newest one. A rollout actor that dies
is restarted and its request sent again (cluster.supervisor); a learner rank or the buffer
that dies fails the job with the command that resumes it.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import ray

from cluster import checkpoint, logs, tracking
from cluster.actors import Rollouts, placement, rollout_factory, start_actors, stop_actors
from cluster.config import ConfigError, JobConfig
from cluster.errors import first_line
from cluster.events import EventLog, summary as events_summary
from cluster.evaluate import greedy_score
from cluster.job_state import JobObserver, Observers
from cluster.observers import ProgressObserver, StatusObserver, TrackerObserver
from cluster.preflight import JobInputs, check_inputs, resolve_inputs  # noqa: F401 - resolve_inputs re-exported
from cluster.report import placement_summary, write_report
from cluster.rollouts import RolloutPump, item_stream, prompt_stream
from cluster.run_dir import make_private_dir, set_aside
from cluster.supervisor import ActorLostError, Supervisor
from cluster.trainer import Trainer
from services.buffer_files import clear_spill_dir, copy_snapshot
from services.status import JobStatus, StatusServer


log = logs.info  # one line on the ``ammd`` logger (cluster.logs)


def init_ray(cfg: JobConfig) -> None:
    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        log(f"connecting to the Ray cluster at {address}")
        ray.init(address=address, log_to_driver=True)
    else:
        # A private cluster of this process only: Ray 2.60's default token auth would write
        # a token into ~/.ray for nothing, so it is off unless the user set RAY_AUTH_MODE.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        need = cfg.rollout.student_actors + cfg.rollout.teacher_actors + cfg.learner.actors
        # address="local": a new cluster even where a ray_current_cluster file (stale, or of a
        # `ray start` head) would make ray.init join it or fail on num_cpus.
        ray.init(address="local", num_cpus=cfg.ray.num_cpus or max(need, os.cpu_count() or 1),
                 include_dashboard=False, log_to_driver=True)
        from cluster.reaper import start_reaper
        start_reaper()  # kills this cluster's processes if the driver dies without shutdown


@dataclass
class Job:
    """The running job's parts, handed together to the loop's helpers and its observers."""

    inputs: JobInputs
    trainer: Trainer               # trainer.state: the JobState every reader reads
    pump: RolloutPump
    supervisor: Supervisor
    observers: Observers           # status, trackers, progress, and any the caller added


def run_job(cfg: JobConfig, rollouts: Rollouts | None = None, resume: bool = False,
            resume_hint: Optional[str] = None, observers: Sequence[JobObserver] = ()) -> dict[str, Any]:
    """Run one distillation job to the end and return its report.

    ``rollouts``: rollout actors started by the caller (``cluster.actors.start_rollouts``) for a
    sweep of jobs on one model pair; the job resets their student weights to its own initial
    ones and leaves them running. By default the job starts and stops its own.
    ``resume``: continue ``<output_dir>/<name>`` from its newest complete checkpoint.
    ``resume_hint``: the command that resumes this job, quoted when it fails.
    ``observers``: told of every phase and learner step after the job's own (status, trackers,
    progress), e.g. a benchmark's probe (cluster.job_state.JobObserver).
    Every input is checked (cluster.preflight) before a file is written or Ray starts.
    """
    started = time.time()
    inputs = check_inputs(cfg, resume)
    cfg = inputs.cfg
    log(f"{len(inputs.train)} training prompts, {len(inputs.evals)} evaluation prompts, metric {cfg.eval.metric}")
    _prepare_run_dir(inputs)
    status = JobStatus(cfg.name, cfg.learner.steps, actor_timeout_s=cfg.ray.actor_timeout_s)
    status.update(metric=cfg.eval.metric)  # names the evaluation score for the page and `ammd status`
    server = _start_status(status, cfg)  # before Ray: a port problem costs no actor start
    events = EventLog(inputs.run_dir)
    if inputs.saved is not None:
        events.record("resume", checkpoint=str(inputs.resume_from), step=inputs.saved["trainer"]["step"])
    else:
        events.record("start", steps=cfg.learner.steps)
    init_ray(cfg)
    actors, trackers, job = None, None, None
    try:
        history = inputs.saved["trainer"]["history"] if inputs.saved is not None else None
        trackers = tracking.start(cfg, inputs.run_dir, history)
        log("starting actors (buffer, rollout engines, learner group)")
        actors = start_actors(cfg, inputs.pair, rollouts, str(inputs.spill_dir) if inputs.spill_dir else None)
        where = placement(actors, cfg.ray.actor_timeout_s)
        status.update(placement=where)  # /status shows which node each actor runs on
        log(f"placement: {placement_summary(where)}")
        _record_recovery(actors, events, cfg.ray.actor_timeout_s)
        watchers = Observers([StatusObserver(status), TrackerObserver(trackers, status), ProgressObserver(),
                              *observers])
        job = _assemble(inputs, actors, watchers, resume_hint or "ammd run CONFIG --resume")
        job.supervisor.events = events
        report = _run(job, started)
        watchers.phase(job, "finished")
        return report
    except BaseException as err:
        if job is not None:
            job.observers.phase(job, "failed")
        status.update(state="failed", error=f"{type(err).__name__}: {err}")
        events.record("failed", error=f"{type(err).__name__}: {first_line(err)}")
        raise
    finally:
        if trackers is not None:
            trackers.close()
        if actors is not None:
            stop_actors(actors)
        if server:
            server.stop()


def _prepare_run_dir(inputs: JobInputs) -> None:
    """Make the run directory (private), set an earlier run's checkpoints aside for a new job,
    and lay out the buffer's spill directory: cleared of this run's old buffer files for a new
    job, the checkpoint's buffer copied in for a resume. Only what check_inputs accepted."""
    cfg, run_dir = inputs.cfg, inputs.run_dir
    try:
        make_private_dir(run_dir)
    except OSError as err:
        raise ConfigError(f"output_dir: cannot create the run directory {run_dir} "
                          f"({err.strerror or err}); point output_dir at a directory you can write") from None
    if inputs.saved is not None:
        log(f"resuming from {inputs.resume_from} (step {inputs.saved['trainer']['step']} of {cfg.learner.steps})")
    elif (moved := checkpoint.set_aside(run_dir)) is not None:
        log(f"starting {cfg.name} over: the checkpoints of its earlier run are kept in {moved} "
            f"(ammd run ... --resume continues a run instead)")
    if inputs.saved is None:
        set_aside(EventLog(run_dir).path.parent)  # an earlier run's events are not this job's
    if inputs.spill_dir is None:
        return
    try:
        clear_spill_dir(inputs.spill_dir)  # the buffer's own files only (check_inputs saw no other)
        if inputs.resume_from is not None:
            copy_snapshot(str(inputs.resume_from / "buffer"), str(inputs.spill_dir))
        make_private_dir(inputs.spill_dir)
    except (OSError, ValueError) as err:
        raise ConfigError(f"buffer.spill_dir {inputs.spill_dir} could not be prepared ({err}); "
                          f"point buffer.spill_dir at a new or empty directory you can write") from None


def _assemble(inputs: JobInputs, actors, observers: Observers, hint: str) -> Job:
    """The trainer, the supervisor of the rollout actors and the rollout pump, wired together."""
    cfg = inputs.cfg
    trainer = Trainer(cfg, actors, inputs.run_dir, hint, log)
    restart_weights = trainer.weight_push.payload_for_restart  # a restarted student's first load
    supervisor = Supervisor(actors, rollout_factory(cfg, inputs.pair), restart_weights,
                            max_restarts=cfg.rollout.max_restarts, window_s=cfg.rollout.restart_window_s,
                            timeout_s=cfg.ray.actor_timeout_s, log=log, how_to_resume=trainer.how_to_resume)
    references = inputs.references
    pump = RolloutPump(actors.students, actors.teachers, actors.buffer, prompt_stream(inputs.train, cfg.seed),
                       item_stream(references, cfg.seed + 1) if references else None,
                       batch_size=cfg.rollout.prompts_per_batch, supervisor=supervisor,
                       timeout_s=cfg.ray.actor_timeout_s)
    return Job(inputs, trainer, pump, supervisor, observers)


def _run(job: Job, started: float) -> dict[str, Any]:
    """Push the first weights (or restore a checkpoint), train, score, export and report."""
    trainer, inputs, scores = job.trainer, job.inputs, job.trainer.state.scores
    if inputs.saved is not None:
        trainer.restore(inputs.resume_from, inputs.saved)
        job.pump.restore(inputs.saved["pump"])
        trainer.push_weights(version=trainer.version)  # the restored weights, under their version
        scores = trainer.state.scores
    else:
        trainer.push_weights(version=0)  # the students start from the learner's weights
        job.observers.phase(job, "evaluating")
        scores.update(teacher=_score(job, "teacher")["score"], before=_score(job)["score"])
    log(f"before training: teacher {scores['teacher']:.3f}, student {scores['before']:.3f}")
    _train(job, {"config": inputs.cfg.model_dump(), "fingerprints": inputs.fingerprints})
    after = _score(job)
    log(f"after training: student {after['score']:.3f} (was {scores['before']:.3f}, teacher {scores['teacher']:.3f})")
    student_dir = trainer.export_student(inputs.run_dir / "student")
    trainer.weight_push.close()  # the job's pushes are over: a side band is left, the payload freed
    log(f"student written to {student_dir}")
    report = _report(job, after, student_dir, started)
    log(f"report written to {write_report(inputs.run_dir, report)}")
    return report


def _start_status(status: JobStatus, cfg: JobConfig) -> Optional[StatusServer]:
    if not cfg.status.enabled:
        return None
    try:
        return StatusServer(status, cfg.status.host, cfg.status.port).start()
    except RuntimeError as err:
        raise ConfigError(f"status.port: {err}") from None


def _score(job: Job, role: str = "student") -> dict:
    """Greedy score of student-0 (or teacher-0); a lost actor is restarted and asked again."""
    name, trainer = f"{role}-0", job.trainer
    group = trainer.actors.students if role == "student" else trainer.actors.teachers
    timeout, metric = trainer.cfg.ray.actor_timeout_s, trainer.cfg.eval.metric
    evals, tokenizer = job.inputs.evals, job.inputs.pair.tokenizer
    try:
        return greedy_score(group[0], evals, tokenizer, metric, timeout)
    except ray.exceptions.RayActorError as err:
        job.supervisor.recover([name], err)
        return greedy_score(group[0], evals, tokenizer, metric, timeout)
    except ray.exceptions.GetTimeoutError:
        raise ActorLostError(f"{name} did not answer an evaluation within ray.actor_timeout_s="
                             f"{timeout:.0f} s. {trainer.how_to_resume()}") from None


def _record_recovery(actors, events: EventLog, timeout: float) -> None:
    """Put what the buffer could not recover (a corrupt or missing segment) in the event log."""
    stats = ray.get(actors.buffer.stats.remote(), timeout=timeout)
    if stats["recovery_problems"]:
        events.record("recovery", problems=stats["recovery_problems"], lost_rows=stats["lost_rows"])
        for problem in stats["recovery_problems"]:
            logs.get_logger().warning(f"replay buffer recovery: {problem}")


def _report(job: Job, after: dict, student_dir: Path, started: float) -> dict:
    trainer, cfg, state = job.trainer, job.inputs.cfg, job.trainer.state
    buffer_stats = trainer.waiter.wait(trainer.actors.buffer.stats.remote(), "the replay buffer")
    whole_job = events_summary(EventLog(job.inputs.run_dir).read())  # every process of the job
    return {
        "name": cfg.name, "metric": cfg.eval.metric,
        "teacher_score": state.scores["teacher"], "student_score_before": state.scores["before"],
        "student_score_after": after["score"], "steps": state.step,
        "final_weight_version": trainer.version, "student_dir": str(student_dir),
        "last_checkpoint": str(state.last_checkpoint) if state.last_checkpoint else None,
        "rows_by_source": buffer_stats["rows_by_source"],
        "buffer_appended_by_source": buffer_stats["appended_by_source"],
        # Rows the buffer could not recover (a corrupt or missing segment) and why, over the job.
        "lost_rows": buffer_stats["lost_rows"], "recovery_problems": whole_job["recovery_problems"],
        "resumes": whole_job["resumes"], "failures": whole_job["failures"],
        "max_on_policy_lag": state.max_lag, "evals": state.evals,
        "rollout_usage": job.pump.usage(buffer_stats["served_by_source"]),
        "restarts": whole_job["restarts"],  # rollout actor restarts, in every process of the job
        "wall_seconds": time.time() - started,
        # From run_job's start (checks, Ray, actors, first push, scores before) to the first step.
        "seconds_to_first_step": state.first_step_at - started if state.first_step_at is not None else None,
        "rollout_tokens_per_s": job.pump.tokens_per_s(),
        "learner_tokens_per_s": state.learner_tokens_per_s(),
        "history": state.history, "examples_after": after["examples"],
        # Asked again at the end: a restarted rollout actor may run elsewhere than its first.
        "placement": placement(trainer.actors, cfg.ray.actor_timeout_s),
        "config": cfg.model_dump(),
    }


def _evaluate_during(job: Job) -> None:
    """Score the student actor's current weights (the last pushed version) on held-out prompts."""
    state, version = job.trainer.state, job.trainer.version
    score = _score(job)["score"]
    state.evals.append({"step": state.step, "weight_version": version, "score": score})
    log(f"step {state.step}: student {job.inputs.cfg.eval.metric} {score:.3f} (weight version {version})")


def _checkpoint(job: Job, extra: dict) -> None:
    """Drain the rollouts (so the buffer and the prompt streams agree), make sure the rollout
    actors hold exactly the learner's weights, then save everything."""
    job.pump.drain()
    if job.trainer.pushed_at != job.trainer.state.step:
        job.trainer.push_weights()
    job.trainer.save(job.pump.state(), extra)


def _train(job: Job, extra: dict) -> None:
    """The loop: one learner step per turn, rollouts topped up around it; pushes, evaluations
    and checkpoints when due; every observer told of each step."""
    trainer, pump, state = job.trainer, job.pump, job.trainer.state
    lc, every = trainer.cfg.learner, trainer.cfg.eval.every
    job.observers.phase(job, "training")
    while state.step < lc.steps:
        pump.top_up(trainer.demand())
        # No poll between top_up and wait_one: a request collected there (e.g. one that landed
        # stale just after a push) would leave wait_one nothing to wait for.
        if not trainer.try_step():
            pump.wait_one()
            continue
        pump.poll()
        if state.step % lc.sync_every == 0:
            trainer.push_weights()
        if every and state.step % every == 0:
            _evaluate_during(job)
        if lc.save_every and (state.step % lc.save_every == 0 or state.step == lc.steps):
            _checkpoint(job, extra)  # after the evaluation, so it holds that score
        job.observers.stepped(job)
    pump.drain()
    if trainer.pushed_at != state.step:  # the final evaluation and export see the last step
        trainer.push_weights()
    job.observers.phase(job, "trained")
