"""The speed benchmark (issue #13, item 5 a-e): ammd against its peers and its own options.

Every part runs in the same process, one after the other, each measuring ours and the baseline
side by side on the same input (the modules say how):
  (a) bench/speed_rollout.py  student rollout tokens/s: vLLM against transformers ``generate``;
  (b) bench/speed_push.py     weight-push seconds per transport and model size, against a memcpy;
  (c) bench/speed_jobs.py     the real job at buffer.max_staleness 0, 1, 2: learner busy fraction
                              and student tokens/s;
  (d) bench/speed_e2e.py      learner steps/s and tokens/s of ammd's job against TRL's GKDTrainer,
                              at the realistic scale and the toy scale;
  (e) bench/speed_memory.py   AMM's per-rank peak memory against forward KL's at a 128k
                              vocabulary (bench/amm_memory.py, one subprocess per loss);
  (f) bench/speed_status.py   the toy job's steps/s with and without 50 status requests/s.
The realistic pair (bench/speed_models.py): Llama-architecture, 32k vocabulary, a ~20M student
and a ~106M teacher (and a ~297M model for the push), built locally and cached under
artifacts/speed; bf16 where this CPU runs it faster than fp32, else fp32 (the JSON says which).

    python -m bench.speed --benchmarks-md BENCHMARKS.md   # the full run (make bench-speed)
    python -m bench.speed --smoke --out /tmp/speed         # every part, shrunk to minutes

Results: ``<out>/speed.json`` (the commit, the command and every figure; ``ratios`` holds each
part's ratio), ``<out>/speed.md``, and with ``--benchmarks-md`` the section of that file between
the speed markers. A part that fails is recorded with its error, the others still run, and the
exit status is then 1.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from bench.quality import git_commit
from bench.speed_models import REALISTIC, SMOKE, Sizes, SpeedWorld, build_world, pick_dtype
from bench.speed_report import collect_ratios, write_outputs

ROOT = Path(__file__).resolve().parents[1]
TOY_MAX_PROMPT, TOY_MAX_RESPONSE = 24, 20  # the quality benchmark's (configs/bench-quality.yaml)


@dataclass(frozen=True)
class Plan:
    """How big every part is."""

    sizes: Sizes
    push_models: tuple[str, ...]    # (b): models of ``sizes`` pushed as the student
    rollout_prompts: int            # (a)
    max_tokens: int                 # (a): most new tokens per response
    stop_every: int                 # (a): every n-th token id ends a response
    repeats: int                    # (a) and (b): timed repeats
    job_steps: int                  # (c), (d) realistic: learner steps per job
    job_batch: int                  # (c), (d) realistic: rows per learner step
    max_prompt: int
    max_response: int
    eval_size: int
    toy_task: str                   # (d) toy scale: a world of tasks/build.py
    toy_steps: int
    toy_batch: int
    trl_threads: tuple[int, ...]    # (d): TRL's thread counts
    status_pairs: int               # (f): unloaded/loaded pairs of toy jobs


FULL = Plan(REALISTIC, ("student", "teacher", "push-300M"), rollout_prompts=64, max_tokens=64, stop_every=32,
            repeats=3, job_steps=16, job_batch=16, max_prompt=24, max_response=32, eval_size=8,
            toy_task="summarize", toy_steps=100, toy_batch=32, trl_threads=(1, 2), status_pairs=3)
SMOKE_PLAN = Plan(SMOKE, ("student",), rollout_prompts=8, max_tokens=16, stop_every=32, repeats=1,
                  job_steps=3, job_batch=4, max_prompt=16, max_response=12, eval_size=4,
                  toy_task="summarize", toy_steps=3, toy_batch=8, trl_threads=(1,), status_pairs=1)


def log(msg: str) -> None:
    print(f"[speed {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def machine() -> dict:
    """The CPU, its cores and RAM, and the rollout dtype chosen for it."""
    def first(path: str, key: str) -> str:
        with open(path) as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith(key)), "unknown")
    ram = int(first("/proc/meminfo", "MemTotal").split()[0]) * 1024
    return {"cpu": first("/proc/cpuinfo", "model name"), "cores": os.cpu_count(),
            "ram_gib": round(ram / 2**30, 1), "gpu": "not measured (no GPU lent)", **pick_dtype()}


def realistic_overrides(world: SpeedWorld, plan: Plan, dtype: str, model: Path | None = None) -> list[str]:
    """The realistic job; with ``model``, that model is both student and teacher (part (b))."""
    from bench.speed_jobs import job_overrides
    return job_overrides(teacher=str(model or world.teacher), student=str(model or world.student),
                         train=str(world.train_path), eval_path=str(world.eval_path), metric="exact_match",
                         steps=plan.job_steps, batch=plan.job_batch, dtype=dtype, max_prompt=plan.max_prompt,
                         max_response=plan.max_response, eval_size=plan.eval_size)


def toy_world(plan: Plan) -> Any:
    """The toy world of part (d) (tasks/build.py, cached under artifacts/toy)."""
    from tasks.build import build_toy_world
    return build_toy_world(ROOT / "artifacts" / "toy", task=plan.toy_task, seed=0, log=log)


def toy_overrides(plan: Plan, dtype: str) -> list[str]:
    from bench.speed_jobs import job_overrides

    w = toy_world(plan)
    return job_overrides(teacher=str(w.teacher_dir), student=str(w.student_dir), train=str(w.train_path),
                         eval_path=str(w.test_path), metric=w.metric, steps=plan.toy_steps, batch=plan.toy_batch,
                         dtype=dtype, max_prompt=TOY_MAX_PROMPT, max_response=TOY_MAX_RESPONSE,
                         eval_size=plan.eval_size)


def start_ray(num_cpus: int) -> str:
    """An embedded Ray cluster in a fresh temp dir (a stale one breaks ray.init: PLATFORM.md)."""
    import ray

    from cluster.reaper import start_reaper

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no token written to ~/.ray
    tmp = tempfile.mkdtemp(prefix="ray_speed_", dir="/tmp")
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, _temp_dir=tmp)
    start_reaper()
    return tmp


def part(result: dict, key: str, fn: Callable[[], Any]) -> Any:
    """``result[key] = fn()``; a failure is recorded as ``{"error": ...}`` and the run goes on."""
    t0 = time.time()
    try:
        result[key] = fn()
    except Exception as err:  # noqa: BLE001 - recorded, and the exit status says so
        traceback.print_exc()
        result[key] = {"error": f"{type(err).__name__}: {str(err).strip()[:2000]}"}
        log(f"{key} FAILED: {result[key]['error'][:300]}")
    if isinstance(result[key], dict):
        result[key]["seconds"] = round(time.time() - t0, 1)
    return result[key]


def run_on_ray(result: dict, plan: Plan, world: SpeedWorld, dtype: str) -> dict:
    """Parts (a), (b), (c) and ammd's side of (d) on one Ray cluster; returns the toy jobs."""
    from bench.speed_jobs import BASE_CONFIG, measure_overlap, run_jobs
    from bench.speed_push import measure_push
    from bench.speed_rollout import measure_rollout
    from bench.speed_status import measure_status_load
    from cluster.config import load_config
    from cluster.data import load_prompts
    from cluster.models import check_models

    cfg = load_config(BASE_CONFIG, realistic_overrides(world, plan, dtype))
    pair = check_models(str(world.teacher), str(world.student), plan.max_prompt, plan.max_response)
    prompts = [p.ids for p in load_prompts(str(world.train_path), pair.chat, plan.max_prompt,
                                           limit=plan.rollout_prompts)]
    part(result, "rollout", lambda: measure_rollout(cfg, pair, prompts, max_tokens=plan.max_tokens,
                                                   stop_every=plan.stop_every, repeats=plan.repeats, log=log))
    part(result, "weight_push", lambda: measure_push(
        lambda name: load_config(BASE_CONFIG, realistic_overrides(world, plan, dtype, world.models[name])),
        {name: world.params[name] for name in plan.push_models}, plan.repeats, log))
    part(result, "overlap", lambda: measure_overlap(
        run_jobs(realistic_overrides(world, plan, dtype), [0, 1, 2], "realistic", log)))
    toy: dict = {}
    part(toy, "jobs", lambda: {"runs": run_jobs(toy_overrides(plan, dtype), [1], "toy", log)})
    part(result, "status_load", lambda: measure_status_load(toy_overrides(plan, dtype), pairs=plan.status_pairs,
                                                            log=log))
    return toy


def run_trl_side(result: dict, plan: Plan, world: SpeedWorld, toy_jobs: dict) -> None:
    """TRL's side of (d) on each scale's pair, after Ray is gone, and the comparisons with ammd's
    job at max_staleness 1 on the same pair (from part (c), and the toy job)."""
    from bench.speed_e2e import compare, run_trl_speed
    from bench.speed_jobs import LR, TEMPERATURE

    toy = toy_world(plan)
    ammd = {"realistic": next((r for r in result["overlap"].get("runs", []) if r["max_staleness"] == 1), None),
            "toy": (toy_jobs.get("jobs", {}).get("runs") or [None])[0]}
    pairs = {"realistic": dict(student=str(world.student), teacher=str(world.teacher), train=str(world.train_path),
                               steps=plan.job_steps, batch=plan.job_batch, max_new_tokens=plan.max_response),
             "toy": dict(student=str(toy.student_dir), teacher=str(toy.teacher_dir), train=str(toy.train_path),
                         steps=plan.toy_steps, batch=plan.toy_batch, max_new_tokens=TOY_MAX_RESPONSE)}
    scratch = Path(tempfile.mkdtemp(prefix="bench-speed-trl-", dir=ROOT / "runs"))

    def scale_part(scale: str) -> dict:
        if ammd[scale] is None:
            raise RuntimeError(f"ammd's {scale} job did not run (see its part's error)")
        return compare(ammd[scale], [run_trl_speed(**pairs[scale], lr=LR, temperature=TEMPERATURE, threads=t,
                                                   seed=0, out=scratch / f"{scale}-t{t}", log=log)
                                     for t in plan.trl_threads])

    e2e: dict = {}
    try:
        for scale in pairs:
            part(e2e, scale, lambda: scale_part(scale))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # TRL's logs; what matters is in speed.json
    result["e2e"] = e2e


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="every part, shrunk (tiny models, a few steps)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="where speed.json and speed.md go")
    ap.add_argument("--benchmarks-md", default=None, help="rewrite the speed section of this file")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    plan, started, commit = SMOKE_PLAN if args.smoke else FULL, time.time(), git_commit()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "-m", "bench.speed", *(sys.argv[1:] if argv is None else argv)])
    result: dict[str, Any] = {"commit": commit, "command": command, "smoke": args.smoke, "machine": machine()}
    dtype = result["machine"]["dtype"]
    log(f"rollout dtype {dtype}: {result['machine']['reason']}")
    world = build_world(plan.sizes, log=log)
    result["models"] = {name: {"dir": str(d.relative_to(ROOT)), "params": world.params[name],
                               "shape": plan.sizes.models[name].__dict__, "vocab": world.vocab}
                        for name, d in world.models.items()}
    import ray
    tmp = start_ray(num_cpus=6)
    try:
        toy_jobs = run_on_ray(result, plan, world, dtype)
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    run_trl_side(result, plan, world, toy_jobs)
    from bench.speed_memory import run_memory
    part(result, "memory", lambda: run_memory(args.smoke))
    result["ratios"] = collect_ratios(result)
    result["wall_seconds"] = round(time.time() - started, 1)
    write_outputs(result, out, args.benchmarks_md and Path(args.benchmarks_md))
    failed = [k for k in ("rollout", "weight_push", "overlap", "memory", "status_load") if "error" in result[k]]
    failed += [f"e2e.{k}" for k, v in result["e2e"].items() if "error" in v]
    log(f"done in {result['wall_seconds'] / 60:.1f} min; {out / 'speed.json'}"
        + (f"; FAILED parts: {failed}" if failed else ""))
    if failed:
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    main()
