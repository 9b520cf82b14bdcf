"""Part (c), and ammd's side of part (d): the users' job itself, timed in its training loop.

Each run is one ``cluster.driver.run_job`` (the same entry point as ``ammd run``) on rollout
actors shared by the runs of one model pair, so vLLM starts once per pair; every job resets the
student engine to the initial student and starts its own buffer and DeepSpeed learner. What is
measured is the training loop alone (from the first rollout request to the last step's push,
the final drain included), not the start-up, the evaluations before and after, or the export:
``LoopProbe``, an observer of the job (cluster.job_state.JobObserver), times the loop's
"training" to "trained" phases and reads, just before and just after it,
- the learner rank 0's ``stats()`` (``busy_seconds``: time inside ``train_step``),
- the driver's ``Trainer`` counters (steps, trained tokens = response tokens of all ranks),
- each student rollout actor's ``tokens_out`` and ``busy_seconds`` (generation only).
Busy fraction = busy seconds / loop seconds; tokens/s = tokens / loop seconds.

Every job here is the GKD mix of ``bench/quality.py`` (generalized JSD 0.5 on half student
samples, half dataset responses, teacher top-k from the vLLM teacher), one learner rank, a
weight push after every step (``learner.sync_every=1``) so that ``buffer.max_staleness`` counts
learner steps: 0 is the synchronous loop (sample, score, train, push, sample...), 1 lets the next
step's rollouts run while the learner trains on the current one.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Callable

import ray

from bench.speed_rollout import _vllm_counters
from cluster.job_state import JobObserver

ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = ROOT / "configs" / "local-cpu.yaml"
GKD_MIX = ["loss.name=generalized_jsd", "loss.params.beta=0.5", "rollout.off_policy=dataset",
           "buffer.on_policy_fraction=0.5"]
LR, TEMPERATURE = 1e-3, 1.0  # TRL's side of part (d) takes the same
COMMON = ["learner.actors=1", "learner.sync_every=1", "learner.save_every=0", "eval.every=0",
          "buffer.spill=false", "status.enabled=false", "ray.num_cpus=6", f"learner.lr={LR}",
          f"rollout.temperature={TEMPERATURE}"]


def job_overrides(*, teacher: str, student: str, train: str, eval_path: str, metric: str, steps: int,
                  batch: int, dtype: str, max_prompt: int, max_response: int, eval_size: int) -> list[str]:
    """The ``a.b=c`` overrides of configs/local-cpu.yaml for one pair (staleness and name apart)."""
    return [*COMMON, *GKD_MIX, f"models.teacher={teacher}", f"models.student={student}",
            f"data.train={train}", f"data.eval={eval_path}", f"eval.metric={metric}",
            f"data.max_prompt_tokens={max_prompt}", f"data.max_response_tokens={max_response}",
            f"data.eval_size={eval_size}", f"learner.steps={steps}", f"learner.micro_batch={batch}",
            f"rollout.prompts_per_batch={batch}", f"rollout.dtype={dtype}"]


def _counters(trainer: Any) -> dict[str, float]:
    timeout = trainer.cfg.ray.actor_timeout_s
    stats = ray.get(trainer.actors.learners[0].stats.remote(), timeout=timeout)
    students = ray.get([s.__ray_call__.remote(_vllm_counters) for s in trainer.actors.students], timeout=timeout)
    return {"learner_busy_s": stats["busy_seconds"], "steps": trainer.state.step,
            "learner_tokens": trainer.state.tokens, "student_tokens": sum(t for t, _ in students),
            "student_busy_s": sum(b for _, b in students)}


class LoopProbe(JobObserver):
    """Times every job's training loop (its "training" to its "trained" phase) and reads the
    counters around it; one dict per job (``loop_seconds`` and the counters' increments) is
    appended to ``records``. An observer of the job (``run_job(observers=[probe])``): it
    changes no behaviour and patches nothing."""

    def __init__(self) -> None:
        self.records: list[dict] = []
        self._before: dict[str, float] = {}
        self._t0 = 0.0

    def phase(self, job: Any, name: str) -> None:
        if name == "training":
            self._before, self._t0 = _counters(job.trainer), time.perf_counter()
        elif name == "trained":
            wall = time.perf_counter() - self._t0
            after = _counters(job.trainer)
            self.records.append({"loop_seconds": wall, **{k: after[k] - self._before[k] for k in after}})


def _record(cfg: Any, report: dict, probe: dict) -> dict:
    wall = probe["loop_seconds"]
    return {"max_staleness": cfg.buffer.max_staleness, "steps": report["steps"],
            "batch": cfg.learner.micro_batch * cfg.learner.actors, "loop_seconds": round(wall, 2),
            "learner_busy_fraction": probe["learner_busy_s"] / wall,
            "learner_steps_per_s": probe["steps"] / wall, "learner_tokens_per_s": probe["learner_tokens"] / wall,
            "learner_tokens": probe["learner_tokens"], "student_tokens": probe["student_tokens"],
            "student_tokens_per_s": probe["student_tokens"] / wall,
            "student_busy_fraction": probe["student_busy_s"] / wall,
            "max_on_policy_lag": report["max_on_policy_lag"], "rows_by_source": report["rows_by_source"],
            "job_wall_seconds": round(report["wall_seconds"], 1)}


def run_jobs(overrides: list[str], stalenesses: list[int], label: str,
             log: Callable[[str], None] = print) -> list[dict]:
    """One job per ``buffer.max_staleness`` value on one pair's shared rollout actors."""
    import tempfile

    from cluster.actors import start_rollouts, stop_rollouts
    from cluster.config import load_config
    from cluster.driver import run_job
    from cluster.models import check_models

    (ROOT / "runs").mkdir(exist_ok=True)
    out = Path(tempfile.mkdtemp(prefix="bench-speed-", dir=ROOT / "runs"))
    cfgs = [load_config(BASE_CONFIG, overrides + [f"buffer.max_staleness={s}", f"output_dir={out}",
                                                  f"name=speed-{label}-s{s}"]) for s in stalenesses]
    m, d = cfgs[0].models, cfgs[0].data
    pair = check_models(m.teacher, m.student, d.max_prompt_tokens, d.max_response_tokens)
    rollouts = start_rollouts(cfgs[0], pair)
    records = []
    try:
        probe = LoopProbe()
        for cfg in cfgs:
            report = run_job(cfg, rollouts, observers=[probe])
            records.append(_record(cfg, report, probe.records[-1]))
            r = records[-1]
            log(f"{label} max_staleness {r['max_staleness']}: {r['steps']} steps in {r['loop_seconds']} s, "
                f"learner busy {r['learner_busy_fraction']:.0%}, student {r['student_tokens_per_s']:.0f} tok/s")
    finally:
        stop_rollouts(rollouts)
        shutil.rmtree(out, ignore_errors=True)  # exported students and reports: read already
    return records


def measure_overlap(records: list[dict]) -> dict:
    """Part (c) from the realistic pair's jobs at max_staleness 0, 1, 2 (``run_jobs``).

    Target: staleness 1 makes >= 1.3x the synchronous loop's student tokens/s, learner busy >= 80%."""
    sync = next(r for r in records if r["max_staleness"] == 0)
    for r in records:
        r["student_tokens_vs_sync"] = r["student_tokens_per_s"] / sync["student_tokens_per_s"]
    one = next(r for r in records if r["max_staleness"] == 1)
    return {"runs": records, "ratio": one["student_tokens_vs_sync"], "target": 1.3, "target_busy": 0.8,
            "met": one["student_tokens_vs_sync"] >= 1.3 and one["learner_busy_fraction"] >= 0.8}
