"""Part (d): end-to-end learner steps/s and tokens/s, ammd against TRL's GKDTrainer.

Same pair, data, batch and sampling on both sides, at the realistic scale and at the toy scale:
- ammd: the users' job with the GKD mix (``bench/speed_jobs.py``: generalized JSD 0.5, half the
  batch the student's own samples, half dataset responses, sampling at the job's temperature, up
  to ``data.max_response_tokens`` new tokens), at ``buffer.max_staleness`` 1 (the default);
  steps/s and tokens/s over its training loop.
- TRL: ``GKDTrainer`` with lmbda 0.5, beta 0.5 (its default mix: a batch is the student's own
  samples or dataset responses, a coin per batch), the same batch size, temperature and
  ``max_new_tokens``, run by ``bench/speed_trl.py`` in ``.venv-trl`` after ammd's Ray cluster is
  shut down, so that it has the machine to itself; steps/s and tokens/s over transformers'
  ``train_runtime``. It runs at each thread count of ``threads`` (1 is what the quality benchmark
  gives it; all cores is what ammd's job uses, spread over its actors), and ammd is compared
  with TRL's faster setting.
Trained tokens are counted the same way on both sides: the response tokens (and end token) the
loss sees. Target: ammd >= TRL in steps/s.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Callable

from bench.trl_runner import _ENV as TRL_ENV, ensure_trl_venv

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "speed_trl.py"


def run_trl_speed(*, student: str, teacher: str, train: str, steps: int, batch: int, lr: float,
                  max_new_tokens: int, temperature: float, threads: int, seed: int, out: Path,
                  log: Callable[[str], None] = print) -> dict:
    """TRL's GKDTrainer (lmbda 0.5) timed in the TRL venv; returns ``trl_speed.json``.

    Raises RuntimeError with the tail of its output if it fails."""
    py = ensure_trl_venv(log)
    out.mkdir(parents=True, exist_ok=True)
    (out / "trl_speed.json").unlink(missing_ok=True)
    cmd = [str(py), str(SCRIPT), "--method", "gkd", "--student", student, "--teacher", teacher,
           "--train", train, "--lr", repr(lr), "--steps", str(steps), "--batch", str(batch),
           "--max-new-tokens", str(max_new_tokens), "--temperature", repr(temperature),
           "--seed", str(seed), "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(TRL_ENV, OMP_NUM_THREADS=str(threads))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    (out / "trl_stdout.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not (out / "trl_speed.json").exists():
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise RuntimeError(f"TRL speed run failed (exit {proc.returncode}):\n{tail}")
    record = json.loads((out / "trl_speed.json").read_text())
    log(f"TRL GKDTrainer, {threads} thread(s): {record['steps_per_s']:.3f} steps/s, "
        f"{record['tokens_per_s']:.0f} tokens/s")
    return record


def compare(ammd: dict, trl_runs: list[dict]) -> dict:
    """ammd's job against TRL's faster thread setting: the ratios of steps/s and tokens/s."""
    best = max(trl_runs, key=lambda r: r["steps_per_s"])
    steps = ammd["learner_steps_per_s"] / best["steps_per_s"]
    return {"ammd": ammd, "trl": trl_runs, "trl_threads_compared": best["threads"],
            "ratio_steps": steps, "ratio_tokens": ammd["learner_tokens_per_s"] / best["tokens_per_s"],
            "target": 1.0, "met": steps >= 1.0}
