"""The job: check inputs, start actors, train while rollouts flow, push weights, report.

Loop (one learner step per iteration):
  1. top up rollouts (cluster.rollouts) with what the learner will consume: no more rows than
     the remaining steps train on, and no on-policy row that would go stale before its turn;
  2. sample a batch: on_policy_fraction of it student rows at most max_staleness versions old;
     if the buffer cannot serve it yet, wait for a rollout and retry;
  3. every learner rank trains on its share of the batch (one DeepSpeed step);
  4. every sync_every steps: rank 0 packs the weights, the student actors load them as
     version v+1 (queued behind their current request; the driver does not wait).
After the last step the weights are pushed once more, so the final evaluation sees them.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray

from cluster.actors import Actors, Rollouts, start_actors, stop_actors
from cluster.config import JobConfig
from cluster.data import load_prompts, reference_rows
from cluster.evaluate import greedy_score
from cluster.models import check_models
from cluster.report import write_report
from cluster.rollouts import Demand, RolloutPump, item_stream, prompt_stream
from services.status import JobStatus, StatusServer

MAX_NONFINITE_STEPS = 3


def log(msg: str) -> None:
    print(f"[ammd {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def resolve_inputs(cfg: JobConfig) -> JobConfig:
    """Fill in the toy teacher/student and data when the config leaves them empty."""
    if cfg.models.teacher is not None:
        return cfg
    from tasks.build import build_toy_world
    from tasks.base import get_task

    log(f"building the toy world (task {cfg.models.toy_task}) under {cfg.models.toy_root} (cached)")
    world = build_toy_world(Path(cfg.models.toy_root), task=cfg.models.toy_task, seed=cfg.seed)
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


class Trainer:
    """The learner side of the loop: sampling, stepping all ranks, pushing weights."""

    def __init__(self, cfg: JobConfig, actors: Actors, status: JobStatus):
        self.cfg, self.actors, self.status = cfg, actors, status
        self.version = 0
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.tokens = 0
        self.train_seconds = 0.0
        self.nonfinite_in_a_row = 0
        self.max_lag = 0
        self.evals: list[dict] = []
        self.global_batch = cfg.learner.micro_batch * cfg.learner.actors
        self.n_on = int(round(self.global_batch * cfg.buffer.on_policy_fraction))

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
        table = ray.get(self.actors.buffer.sample.remote(
            self.global_batch, self.cfg.buffer.on_policy_fraction, self.min_version))
        if table is None:
            return False
        self._note_lag(table)
        t0 = time.time()
        ref = ray.put(table)
        results = ray.get([l.train_step.remote(ref) for l in self.actors.learners])
        self.train_seconds += time.time() - t0
        if any(r["skipped_nonfinite"] for r in results):
            self.nonfinite_in_a_row += 1
            log(f"step {self.step + 1}: non-finite loss, step skipped on every rank")
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

    def save(self, root: Path) -> None:
        """A DeepSpeed checkpoint of every rank (model, optimiser, objective state)."""
        client_state = {"step": self.step, "weight_version": self.version}
        tags = ray.get([l.save.remote(str(root), client_state) for l in self.actors.learners])
        log(f"checkpoint {root / tags[0]}")

    def _note_lag(self, table) -> None:
        """Track how many weight versions the oldest on-policy row of a batch lags behind."""
        versions = [v for v, s in zip(table.column("policy_version").to_pylist(),
                                      table.column("source").to_pylist()) if s == "student"]
        if versions:
            self.max_lag = max(self.max_lag, self.version - min(versions))

    def push_weights(self, version: int | None = None) -> None:
        """Pack weights on rank 0 (all ranks enter, for ZeRO-3) and queue the load on students.

        The students load them as ``version`` (default: the next one). A student actor runs its
        calls in order, so anything asked of it after this sees the new weights.
        """
        lc = self.cfg.learner
        refs = [l.export_weights.remote(lc.weight_transport, lc.bucket_mib, self.cfg.rollout.dtype)
                for l in self.actors.learners]
        payload = refs[0]  # rank 0's buckets; Ray hands them to the students without the driver
        ray.get(refs[1:])  # the other ranks only took part in the gather
        self.version = self.version + 1 if version is None else version
        for student in self.actors.students:
            student.load_weights.remote(payload, self.version)

    def learner_tokens_per_s(self) -> float:
        return self.tokens / max(self.train_seconds, 1e-9)


def run_job(cfg: JobConfig, rollouts: Rollouts | None = None) -> dict[str, Any]:
    """Run one distillation job to the end and return its report.

    ``rollouts``: rollout actors started by the caller (``cluster.actors.start_rollouts``) for a
    sweep of jobs on one model pair; the job resets their student weights to its own initial
    ones and leaves them running. By default the job starts and stops its own.
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
    log(f"{len(train)} training prompts, {len(evals)} evaluation prompts, metric {cfg.eval.metric}")

    init_ray(cfg)
    status = JobStatus(cfg.name, cfg.learner.steps)
    server = StatusServer(status, cfg.status.host, cfg.status.port).start() if cfg.status.enabled else None
    if server:
        log(f"status at {server.url}/status")
    out_dir = Path(cfg.output_dir) / cfg.name
    actors = None
    try:
        log("starting actors (buffer, rollout engines, learner group)")
        actors = start_actors(cfg, pair, rollouts)
        trainer = Trainer(cfg, actors, status)
        trainer.push_weights(version=0)  # the students start from the learner's weights
        status.update(state="evaluating", actors={n: {"state": "starting", "last_seen_s": None}
                                                  for n in _actor_names(actors)})
        teacher_eval = greedy_score(actors.teachers[0], evals, pair.tokenizer, cfg.eval.metric)
        before = greedy_score(actors.students[0], evals, pair.tokenizer, cfg.eval.metric)
        log(f"before training: teacher {teacher_eval['score']:.3f}, student {before['score']:.3f}")
        _train(trainer, train, references, evals, pair.tokenizer)
        after = greedy_score(actors.students[0], evals, pair.tokenizer, cfg.eval.metric)
        log(f"after training: student {after['score']:.3f} (was {before['score']:.3f}, "
            f"teacher {teacher_eval['score']:.3f})")
        buffer_stats = ray.get(actors.buffer.stats.remote())
        report = {
            "name": cfg.name, "metric": cfg.eval.metric,
            "teacher_score": teacher_eval["score"], "student_score_before": before["score"],
            "student_score_after": after["score"], "steps": trainer.step,
            "final_weight_version": trainer.version, "rows_by_source": buffer_stats["rows_by_source"],
            "max_on_policy_lag": trainer.max_lag, "evals": trainer.evals,
            "rollout_usage": trainer.pump.usage(buffer_stats["served_by_source"]),
            "wall_seconds": time.time() - started,
            "rollout_tokens_per_s": trainer.pump.tokens_per_s(),
            "learner_tokens_per_s": trainer.learner_tokens_per_s(),
            "history": trainer.history, "examples_after": after["examples"],
            "config": cfg.model_dump(),
        }
        path = write_report(out_dir, report)
        status.update(state="finished")
        log(f"report written to {path}")
        return report
    except BaseException:
        status.update(state="failed")
        raise
    finally:
        if actors is not None:
            stop_actors(actors)
        if server:
            server.stop()


def _actor_names(actors: Actors) -> list[str]:
    return ([f"student-{i}" for i in range(len(actors.students))] +
            [f"teacher-{i}" for i in range(len(actors.teachers))] +
            [f"learner-{i}" for i in range(len(actors.learners))] + ["buffer"])


def _evaluate_during(trainer: Trainer, evals, tokenizer, status: JobStatus) -> None:
    """Score the student actor's current weights (the last pushed version) on held-out prompts."""
    result = greedy_score(trainer.actors.students[0], evals, tokenizer, trainer.cfg.eval.metric)
    trainer.evals.append({"step": trainer.step, "weight_version": trainer.version, "score": result["score"]})
    status.update(evals=trainer.evals)
    log(f"step {trainer.step}: student {trainer.cfg.eval.metric} {result['score']:.3f} "
        f"(weight version {trainer.version})")


def _train(trainer: Trainer, train, references, evals, tokenizer) -> None:
    cfg, actors, status = trainer.cfg, trainer.actors, trainer.status
    pump = RolloutPump(actors.students, actors.teachers, actors.buffer, prompt_stream(train, cfg.seed),
                       item_stream(references, cfg.seed + 1) if references else None,
                       batch_size=cfg.rollout.prompts_per_batch)
    trainer.pump = pump
    status.update(state="training")
    log_every = max(1, cfg.learner.steps // 20)
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
        if cfg.learner.save_every and trainer.step % cfg.learner.save_every == 0:
            trainer.save(Path(cfg.output_dir).resolve() / cfg.name / "checkpoints")
        if cfg.eval.every and trainer.step % cfg.eval.every == 0:
            _evaluate_during(trainer, evals, tokenizer, status)
        _publish(trainer, pump, status)
        if trainer.step % log_every == 0 or trainer.step == cfg.learner.steps:
            last = trainer.history[-1] if trainer.history else {}
            log(f"step {trainer.step}/{cfg.learner.steps} loss {last.get('loss', float('nan')):.4f} "
                f"version {trainer.version} rollout {pump.tokens_per_s():.0f} tok/s "
                f"learner {trainer.learner_tokens_per_s():.0f} tok/s lr {last.get('lr', float('nan')):.2e} "
                f"rows made {pump.rows}")
    pump.drain()
    if trainer.step % cfg.learner.sync_every != 0:
        trainer.push_weights()


def _publish(trainer: Trainer, pump: RolloutPump, status: JobStatus) -> None:
    # Learner ranks answered this step (a step waits on every rank); rollout actors report
    # when their last request landed, so a hung engine shows as a growing last_seen_s.
    actors = {f"learner-{i}": {"state": "alive", "last_seen_s": 0.0} for i in range(len(trainer.actors.learners))}
    actors.update(pump.health())
    actors["buffer"] = {"state": "alive", "last_seen_s": 0.0}
    buffer = ray.get(trainer.actors.buffer.stats.remote())
    status.update(actors=actors, step=trainer.step, weight_version=trainer.version, buffer=buffer,
                  rollout_usage=pump.usage(buffer["served_by_source"]),
                  rollout_tokens_per_s=pump.tokens_per_s(),
                  learner_tokens_per_s=trainer.learner_tokens_per_s())
