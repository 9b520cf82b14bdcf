"""Part (f): what watching a job costs it. The toy job's learner steps/s with no status
requests, side by side with the same job under a steady load of GETs on ``/status`` and
``/metrics`` (issue 21: 67 requests/s once cut steps/s by 25%, each request copying and
encoding the whole state in the driver's process).

The runs alternate, unloaded then loaded, ``pairs`` times, on one set of rollout actors (vLLM
starts once); each is a ``cluster.driver.run_job`` timed in its training loop
(``bench.speed_jobs.LoopProbe``). A client process of its own (as a Prometheus scraper and a
browser tab are) sends the requests at ``rate`` per second and counts the answers. Target: the loaded job keeps >= 95% of the
unloaded job's steps/s.
"""
from __future__ import annotations

import contextlib
import shutil
import statistics
import tempfile
import multiprocessing
import time
import urllib.request
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.95


class Load:
    """GETs at ``rate``/s, alternating /status and /metrics, from a process of its own (as a
    Prometheus scraper or a browser tab is: a client thread in the driver's process would
    charge the job for the client's work too) until stopped; ``answered`` counts the 200s."""

    def __init__(self, url: str, rate: float):
        ctx = multiprocessing.get_context("spawn")
        self._stop, self._answered = ctx.Event(), ctx.Value("i", 0)
        self.process = ctx.Process(target=_send_requests, args=(url, rate, self._stop, self._answered),
                                   daemon=True)

    @property
    def answered(self) -> int:
        return self._answered.value

    def __enter__(self) -> "Load":
        self.process.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self.process.join(timeout=10)


def _send_requests(url: str, rate: float, stop, answered) -> None:
    paths, n, period, next_at = ("/status", "/metrics"), 0, 1.0 / rate, time.perf_counter()
    while not stop.is_set():
        try:
            with urllib.request.urlopen(url + paths[n % 2], timeout=2) as r:
                r.read()
                if r.status == 200:
                    with answered.get_lock():
                        answered.value += 1
        except OSError:
            pass  # the server is not up yet, or already gone
        n += 1
        next_at += period
        stop.wait(max(0.0, next_at - time.perf_counter()))


def measure_status_load(overrides: list[str], rate: float = 50.0, pairs: int = 2,
                        log: Callable[[str], None] = print) -> dict:
    """Steps/s of the job of ``overrides`` without and with ``rate`` status requests per second."""
    from bench.speed_jobs import BASE_CONFIG, LoopProbe
    from cluster.actors import start_rollouts, stop_rollouts
    from cluster.config import load_config
    from cluster.driver import run_job
    from cluster.models import check_models
    from learner.learner_actor import free_port

    (ROOT / "runs").mkdir(exist_ok=True)
    out = Path(tempfile.mkdtemp(prefix="bench-status-", dir=ROOT / "runs"))
    runs: list[dict] = []
    rollouts = None
    try:
        for i in range(2 * pairs):
            loaded, port = i % 2 == 1, free_port()
            cfg = load_config(BASE_CONFIG, overrides + ["status.enabled=true", f"status.port={port}",
                                                        f"output_dir={out}", f"name=status-{i}"])
            if rollouts is None:
                m, d = cfg.models, cfg.data
                rollouts = start_rollouts(cfg, check_models(m.teacher, m.student, d.max_prompt_tokens,
                                                            d.max_response_tokens))
            load, probe = Load(f"http://127.0.0.1:{port}", rate) if loaded else None, LoopProbe()
            with load or contextlib.nullcontext():
                run_job(cfg, rollouts, observers=[probe])
            probe = probe.records[-1]
            runs.append({"loaded": loaded, "steps_per_s": probe["steps"] / probe["loop_seconds"],
                         "loop_seconds": round(probe["loop_seconds"], 2),
                         "requests_answered": load.answered if load else 0})
            log(f"status load {'on ' if loaded else 'off'}: {runs[-1]['steps_per_s']:.2f} steps/s, "
                f"{runs[-1]['requests_answered']} requests answered")
    finally:
        if rollouts is not None:
            stop_rollouts(rollouts)
        shutil.rmtree(out, ignore_errors=True)
    off = statistics.mean(r["steps_per_s"] for r in runs if not r["loaded"])
    on = statistics.mean(r["steps_per_s"] for r in runs if r["loaded"])
    return {"runs": runs, "rate": rate, "steps_per_s_unloaded": off, "steps_per_s_loaded": on,
            "ratio": on / off, "target": TARGET, "met": on / off >= TARGET}


def main(argv: list[str] | None = None) -> dict:
    """Part (f) alone, on the full plan's toy job (``make bench-speed`` runs it with the rest)."""
    import argparse
    import json

    import ray

    from bench.speed import FULL, log, start_ray, toy_overrides
    from bench.speed_models import pick_dtype

    ap = argparse.ArgumentParser(description="part (f) of bench.speed alone")
    ap.add_argument("--rate", type=float, default=50.0, help="status requests per second")
    ap.add_argument("--pairs", type=int, default=3, help="unloaded/loaded pairs of runs")
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    args = ap.parse_args(argv)
    tmp = start_ray(num_cpus=6)
    try:
        result = measure_status_load(toy_overrides(FULL, pick_dtype()["dtype"]), args.rate, args.pairs, log)
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return result


if __name__ == "__main__":
    main()
