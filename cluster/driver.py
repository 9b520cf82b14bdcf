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
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import ray

from cluster import checkpoint, logs, tracking
from cluster.actors import Actors, Rollouts, placement, rollout_factory, start_actors, stop_actors
from cluster.config import ConfigError, JobConfig
from cluster.data import DataError, load_prompts, reference_rows
from cluster.evaluate import greedy_score
from cluster.models import check_models
from cluster.report import placement_summary, write_report
from cluster.rollouts import RolloutPump, item_stream, prompt_stream
from cluster.supervisor import ActorLostError, Supervisor
from cluster.trainer import Trainer
from services.replay_buffer import copy_snapshot, spill_owner
from services.status import JobStatus, StatusServer


log = logs.info  # one line on the ``ammd`` logger (cluster.logs)


def resolve_inputs(cfg: JobConfig) -> JobConfig:
    """Fill in the toy teacher/student and data when the config leaves them empty."""
    if cfg.models.teacher is not None:
        return cfg
    from tasks.build import build_toy_world
    from tasks.base import get_task

    log(f"building the toy world (task {cfg.models.toy_task}) under {cfg.models.toy_root} (cached)")
    world = build_toy_world(Path(cfg.models.toy_root), task=cfg.models.toy_task, seed=cfg.seed, log=log)
    cfg = cfg.model_copy(deep=True)
    cfg.models.teacher, cfg.models.student = str(world.teacher_dir), str(world.student_dir)
    cfg.data.train = cfg.data.train or str(world.train_path)
    cfg.data.eval = cfg.data.eval or str(world.test_path)
    cfg.eval.metric = get_task(cfg.models.toy_task).metric
    return cfg


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


def run_job(cfg: JobConfig, rollouts: Rollouts | None = None, resume: bool = False,
            resume_hint: Optional[str] = None) -> dict[str, Any]:
    """Run one distillation job to the end and return its report.

    ``rollouts``: rollout actors started by the caller (``cluster.actors.start_rollouts``) for a
    sweep of jobs on one model pair; the job resets their student weights to its own initial
    ones and leaves them running. By default the job starts and stops its own.
    ``resume``: continue ``<output_dir>/<name>`` from its newest complete checkpoint.
    ``resume_hint``: the command that resumes this job, quoted when it fails.
    """
    started = time.time()
    cfg = resolve_inputs(cfg)
    pair = check_models(cfg.models.teacher, cfg.models.student,
                        cfg.data.max_prompt_tokens, cfg.data.max_response_tokens)
    train = load_prompts(cfg.data.train, pair.tokenizer, cfg.data.max_prompt_tokens)
    evals = load_prompts(cfg.data.eval or cfg.data.train, pair.tokenizer, cfg.data.max_prompt_tokens,
                         limit=cfg.data.eval_size)
    references = None
    if cfg.rollout.off_policy == "dataset":
        references = reference_rows(train, pair.tokenizer, pair.stop_token_ids[0],
                                    cfg.data.max_response_tokens, cfg.data.train)
    missing = next((i for i, p in enumerate(evals, 1) if p.reference is None), None)
    if missing is not None:
        raise DataError(f"{cfg.data.eval or cfg.data.train}: row {missing} has no 'response'; the "
                        f"evaluation prompts need one each (the reference the student is scored against)")
    log(f"{len(train)} training prompts, {len(evals)} evaluation prompts, metric {cfg.eval.metric}")
    run_dir = Path(cfg.output_dir).resolve() / cfg.name
    fingerprints = {"teacher": checkpoint.fingerprint(cfg.models.teacher),
                    "student": checkpoint.fingerprint(cfg.models.student)}
    saved, resume_from = None, None
    if resume:
        resume_from = checkpoint.find_resumable(run_dir)
        saved = checkpoint.load_state(resume_from)
        checkpoint.check_compatible(saved, cfg.model_dump(), fingerprints)
        log(f"resuming from {resume_from} (step {saved['trainer']['step']} of {cfg.learner.steps})")
    elif (moved := checkpoint.set_aside(run_dir)) is not None:
        log(f"starting {cfg.name} over: the checkpoints of its earlier run are kept in {moved} "
            f"(ammd run ... --resume continues a run instead)")
    spill_dir = _prepare_spill(cfg, run_dir, resume_from)
    tracking.check(cfg)  # W&B asked for but not installed fails here, before Ray starts

    init_ray(cfg)
    status = JobStatus(cfg.name, cfg.learner.steps, actor_timeout_s=cfg.ray.actor_timeout_s)
    status.update(metric=cfg.eval.metric)  # names the evaluation score for the page and `ammd status`
    server = _start_status(status, cfg)
    if server:
        log(f"status at {server.url}/status")
    actors, trackers = None, None
    try:
        trackers = tracking.start(cfg, run_dir, saved["trainer"]["history"] if saved is not None else None)
        log("starting actors (buffer, rollout engines, learner group)")
        actors = start_actors(cfg, pair, rollouts, spill_dir)
        where = placement(actors, cfg.ray.actor_timeout_s)
        status.update(placement=where)  # /status shows which node each actor runs on
        log(f"placement: {placement_summary(where)}")
        trainer = Trainer(cfg, actors, status, run_dir, resume_hint or "ammd run CONFIG --resume", log)
        supervisor = Supervisor(actors, rollout_factory(cfg, pair), trainer.weights,
                                max_restarts=cfg.rollout.max_restarts, window_s=cfg.rollout.restart_window_s,
                                timeout_s=cfg.ray.actor_timeout_s, log=log, how_to_resume=trainer.how_to_resume)
        pump = RolloutPump(actors.students, actors.teachers, actors.buffer, prompt_stream(train, cfg.seed),
                           item_stream(references, cfg.seed + 1) if references else None,
                           batch_size=cfg.rollout.prompts_per_batch, supervisor=supervisor,
                           timeout_s=cfg.ray.actor_timeout_s)
        if saved is not None:
            trainer.restore(resume_from, saved)
            pump.restore(saved["pump"])
            trainer.push_weights(version=trainer.version)  # the restored weights, under their version
        else:
            trainer.push_weights(version=0)  # the students start from the learner's weights
            status.update(state="evaluating")
            trainer.scores = {"teacher": _score(trainer, supervisor, evals, pair.tokenizer, "teacher")["score"],
                              "before": _score(trainer, supervisor, evals, pair.tokenizer)["score"]}
        log(f"before training: teacher {trainer.scores['teacher']:.3f}, student {trainer.scores['before']:.3f}")
        _train(trainer, pump, supervisor, evals, pair.tokenizer, {"config": cfg.model_dump(),
                                                                 "fingerprints": fingerprints}, trackers)
        after = _score(trainer, supervisor, evals, pair.tokenizer)
        log(f"after training: student {after['score']:.3f} (was {trainer.scores['before']:.3f}, "
            f"teacher {trainer.scores['teacher']:.3f})")
        student_dir = trainer.export_student(run_dir / "student")
        log(f"student written to {student_dir}")
        report = _report(cfg, trainer, pump, supervisor, after, student_dir, started)
        path = write_report(run_dir, report)
        status.update(state="finished")
        log(f"report written to {path}")
        return report
    except BaseException as err:
        status.update(state="failed", error=f"{type(err).__name__}: {err}")
        raise
    finally:
        if trackers is not None:
            trackers.close()
        if actors is not None:
            stop_actors(actors)
        if server:
            server.stop()


def _prepare_spill(cfg: JobConfig, run_dir: Path, resume_from: Optional[Path]) -> Optional[str]:
    """The buffer's directory: emptied for a new job, the checkpoint's buffer for a resume."""
    if not cfg.buffer.spill and resume_from is None:
        return None
    where = Path(cfg.buffer.spill_dir).resolve() if cfg.buffer.spill_dir else run_dir / "buffer"
    owner = spill_owner(where)
    if owner not in (None, cfg.name):  # never delete or take in another job's rows
        raise ConfigError(f"buffer.spill_dir {where} holds the replay buffer of run '{owner}', not "
                          f"'{cfg.name}': point buffer.spill_dir elsewhere or remove that directory")
    shutil.rmtree(where, ignore_errors=True)
    if resume_from is not None:
        # Linked, not rebuilt in place: the checkpoint's own copy must stay as it was.
        copy_snapshot(str(resume_from / "buffer"), str(where))
    return str(where)


def _start_status(status: JobStatus, cfg: JobConfig) -> Optional[StatusServer]:
    if not cfg.status.enabled:
        return None
    try:
        return StatusServer(status, cfg.status.host, cfg.status.port).start()
    except RuntimeError as err:
        raise ConfigError(f"status.port: {err}") from None


def _score(trainer: Trainer, supervisor: Supervisor, evals, tokenizer, role: str = "student") -> dict:
    """Greedy score of student-0 (or teacher-0); a lost actor is restarted and asked again."""
    name = f"{role}-0"
    group = trainer.actors.students if role == "student" else trainer.actors.teachers
    timeout, metric = trainer.cfg.ray.actor_timeout_s, trainer.cfg.eval.metric
    try:
        return greedy_score(group[0], evals, tokenizer, metric, timeout)
    except ray.exceptions.RayActorError as err:
        supervisor.recover([name], err)
        return greedy_score(group[0], evals, tokenizer, metric, timeout)
    except ray.exceptions.GetTimeoutError:
        raise ActorLostError(f"{name} did not answer an evaluation within ray.actor_timeout_s="
                             f"{timeout:.0f} s. {trainer.how_to_resume()}") from None


def _report(cfg: JobConfig, trainer: Trainer, pump: RolloutPump, supervisor: Supervisor, after: dict,
            student_dir: Path, started: float) -> dict:
    buffer_stats = trainer.wait(trainer.actors.buffer.stats.remote(), "the replay buffer")
    return {
        "name": cfg.name, "metric": cfg.eval.metric,
        "teacher_score": trainer.scores["teacher"], "student_score_before": trainer.scores["before"],
        "student_score_after": after["score"], "steps": trainer.step,
        "final_weight_version": trainer.version, "student_dir": str(student_dir),
        "last_checkpoint": str(trainer.last_checkpoint) if trainer.last_checkpoint else None,
        "rows_by_source": buffer_stats["rows_by_source"],
        "buffer_appended_by_source": buffer_stats["appended_by_source"],
        "max_on_policy_lag": trainer.max_lag, "evals": trainer.evals,
        "rollout_usage": pump.usage(buffer_stats["served_by_source"]),
        "restarts": supervisor.restart_counts(),
        "wall_seconds": time.time() - started,
        "rollout_tokens_per_s": pump.tokens_per_s(),
        "learner_tokens_per_s": trainer.learner_tokens_per_s(),
        "history": trainer.history, "examples_after": after["examples"],
        # Asked again at the end: a restarted rollout actor may run elsewhere than its first.
        "placement": placement(trainer.actors, cfg.ray.actor_timeout_s),
        "config": cfg.model_dump(),
    }


def _evaluate_during(trainer: Trainer, supervisor: Supervisor, evals, tokenizer) -> None:
    """Score the student actor's current weights (the last pushed version) on held-out prompts."""
    result = _score(trainer, supervisor, evals, tokenizer)
    trainer.evals.append({"step": trainer.step, "weight_version": trainer.version, "score": result["score"]})
    trainer.status.update(evals=trainer.evals)
    log(f"step {trainer.step}: student {trainer.cfg.eval.metric} {result['score']:.3f} "
        f"(weight version {trainer.version})")


def _checkpoint(trainer: Trainer, pump: RolloutPump, extra: dict) -> None:
    """Drain the rollouts (so the buffer and the prompt streams agree), make sure the rollout
    actors hold exactly the learner's weights, then save everything."""
    pump.drain()
    if trainer.pushed_at != trainer.step:
        trainer.push_weights()
    trainer.save(pump.state(), extra)


def _train(trainer: Trainer, pump: RolloutPump, supervisor: Supervisor, evals, tokenizer, extra: dict,
           trackers: tracking.Trackers) -> None:
    cfg, status = trainer.cfg, trainer.status
    status.update(state="training")
    save_every = cfg.learner.save_every
    shown = logs.progress(cfg.learner.steps, start=trainer.step)
    logged = len(trainer.history)  # records already tracked (a resumed job's earlier steps)
    try:
        while trainer.step < cfg.learner.steps:
            pump.top_up(trainer.demand())
            # No poll between top_up and wait_one: a request collected there (e.g. one that landed
            # stale just after a push) would leave wait_one nothing to wait for.
            if not trainer.try_step():
                pump.wait_one()
                continue
            pump.poll()
            if trainer.step % cfg.learner.sync_every == 0:
                trainer.push_weights()
            if cfg.eval.every and trainer.step % cfg.eval.every == 0:
                _evaluate_during(trainer, supervisor, evals, tokenizer)
            if save_every and (trainer.step % save_every == 0 or trainer.step == cfg.learner.steps):
                _checkpoint(trainer, pump, extra)  # after the evaluation, so it holds that score
            _publish(trainer, pump, supervisor)
            logged = _watch(trainer, pump, trackers, shown, logged)
    finally:
        shown.close()
    pump.drain()
    if trainer.pushed_at != trainer.step:  # the final evaluation and export see the last step
        trainer.push_weights()


def _watch(trainer: Trainer, pump: RolloutPump, trackers: tracking.Trackers, shown: logs.Progress,
           logged: int) -> int:
    """Hand the steps recorded since ``logged`` (exactly report.json's history records) and the
    snapshot just published (what /metrics serves) to the trackers, and show progress.
    Returns the new count of tracked records."""
    new = trainer.history[logged:]
    for record in new:
        trackers.log_step(record)
    if new:  # a skipped (non-finite) step changes nothing worth a second point at this step
        trackers.log_snapshot(trainer.step, trainer.status.snapshot())
    last = trainer.history[-1] if trainer.history else {}
    shown.update(trainer.step, {"loss": last.get("loss", float("nan")), "lr": last.get("lr", float("nan")),
                                "version": trainer.version, "rollout_tps": pump.tokens_per_s(),
                                "learner_tps": trainer.learner_tokens_per_s(), "rows": pump.rows})
    return len(trainer.history)


def _publish(trainer: Trainer, pump: RolloutPump, supervisor: Supervisor) -> None:
    """Everything /status, /metrics, the page and TensorBoard read, once per learner step."""
    # Liveness from real answers: every actor is pinged and its last answer timed.
    supervisor.probe()
    buffer = trainer.wait(trainer.actors.buffer.stats.remote(), "the replay buffer")
    rollout_tps, learner_tps = pump.tokens_per_s(), trainer.learner_tokens_per_s()
    trainer.status.update(actors=_with_actor_rates(supervisor.health(), pump.actor_tokens_per_s()),
                          step=trainer.step, weight_version=trainer.version,
                          buffer=buffer, rollout_usage=pump.usage(buffer["served_by_source"]),
                          restarts=supervisor.restart_counts(), rollout_tokens_per_s=rollout_tps,
                          learner_tokens_per_s=learner_tps, weight_pushes=trainer.weight_pushes,
                          weight_push_seconds=trainer.weight_push_seconds, sampled_age=trainer.sampled_age)
    trainer.status.record_throughput(trainer.step, learner_tps, rollout_tps)


def _with_actor_rates(health: dict[str, dict], rates: dict[str, float]) -> dict[str, dict]:
    """``health`` with ``tokens_per_s`` on every student and teacher (0.0 until its first rows)."""
    for name, info in health.items():
        if info.get("kind") in ("student", "teacher"):
            info["tokens_per_s"] = rates.get(name, 0.0)
    return health
