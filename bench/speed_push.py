"""Part (b): weight-push seconds against model size, per transport, against one memcpy.

For each model size the job's own actors are started on real Ray: one DeepSpeed learner rank
(``learner.learner_actor.LearnerWorker``, ZeRO stage and the rest from the job config) holding
the model, and one student rollout actor (vLLM) holding it too. A *push* is what the job's
``cluster.trainer.Trainer.push_weights`` does, timed from the driver until the student has
loaded it (a ``health`` call queued behind the load returns): the learner side gathers and packs
the weights into buckets, the transport moves them, the rollout side loads them into its vLLM
engine (``reload_weights`` and a prefix-cache reset). Every transport registered in
``learner.weight_sync.TRANSPORTS`` when the bench runs is measured (a name the job config does
not accept for ``learner.weight_transport`` is reported as skipped, with the reason). The first
push of each transport is a warm-up (for ``collective`` it also forms the side-band group) and is
reported apart; then ``repeats`` pushes, median reported.

The floor: one memcpy of the weights, i.e. ``dst.copy_(src)`` for every parameter into
preallocated tensors, in the learner actor itself (same process and thread count), in the push
dtype; best of ``repeats``. For the object store the push is also split into its learner side
(``export_weights`` until the buckets are in the object store) and its rollout side
(``load_weights`` from them).
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import ray

BYTES_PER_PARAM_NEEDED = 8 * 4  # RAM a size needs, per fp32 parameter, all copies together (estimate)


def _memcpy_seconds(worker: Any, dtype: str, repeats: int) -> dict:
    """Inside the learner actor (``__ray_call__``): one copy of every parameter, best of ``repeats``."""
    import torch

    src = [p.detach().to(getattr(torch, dtype)) for p in worker.engine.module.parameters()]
    dst = [torch.empty_like(t) for t in src]
    best = float("inf")
    for _ in range(repeats + 1):  # the first pass touches the pages of dst
        t0 = time.perf_counter()
        for d, s in zip(dst, src):
            d.copy_(s)
        best = min(best, time.perf_counter() - t0)
    return {"seconds": best, "bytes": sum(t.numel() * t.element_size() for t in src),
            "threads": torch.get_num_threads()}


def _timed_push(trainer: Any) -> tuple[float, str]:
    """One ``Trainer.push_weights``, until every student has loaded it: its seconds and the
    transport that delivered it (the object store when the configured one fell back)."""
    t0 = time.perf_counter()
    pushed = trainer.push_weights()
    ray.get([s.health.remote() for s in trainer.actors.students], timeout=trainer.cfg.ray.actor_timeout_s)
    return time.perf_counter() - t0, pushed.transport


def _transport_runs(cfg: Any, actors: Any, transport: str, repeats: int, log: Callable[[str], None]) -> dict:
    """A warm-up push and ``repeats`` timed pushes through ``transport``, as the job makes them."""
    from cluster.config import ConfigError, build_config
    from cluster.trainer import Trainer

    try:
        cfg = build_config(cfg.model_dump(), [f"learner.weight_transport={transport}"])
    except ConfigError as err:
        return {"skipped": f"the job config does not accept it: {err}"}
    messages: list[str] = []
    trainer = Trainer(cfg, actors, Path(tempfile.mkdtemp(prefix="speed-push-")), log=messages.append)
    runs = [_timed_push(trainer) for _ in range(repeats + 1)]
    if any(by != transport for _, by in runs):  # it fell back to the object store
        return {"skipped": f"{transport} did not deliver: {'; '.join(messages)[:300]}"}
    first, times = runs[0][0], [t for t, _ in runs[1:]]
    log(f"(b) {transport}: first push {first:.3f} s, then {', '.join(f'{t:.3f}' for t in times)} s")
    return {"first_push_s": round(first, 4), "runs_s": [round(t, 4) for t in times],
            "push_s": statistics.median(times)}


def _object_store_split(cfg: Any, actors: Any, repeats: int) -> dict:
    """The object-store push in two halves: learner export until the buckets are stored, then
    the student's load from them (medians)."""
    lc, learner, student = cfg.learner, actors.learners[0], actors.students[0]
    export, load = [], []
    for version in range(repeats):
        t0 = time.perf_counter()
        ref = learner.export_weights.remote("object_store", lc.bucket_mib, cfg.rollout.dtype)
        ray.wait([ref], fetch_local=False)
        t1 = time.perf_counter()
        ray.get(student.load_weights.remote(ref, 10_000 + version))
        export.append(t1 - t0), load.append(time.perf_counter() - t1)
    return {"learner_export_s": statistics.median(export), "rollout_load_s": statistics.median(load)}


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))


def measure_size(cfg: Any, name: str, params: int, repeats: int, log: Callable[[str], None]) -> dict:
    """Part (b) for one model (``cfg.models.student``): the floor and every transport's push."""
    from cluster.actors import Rollouts, rollout_factory, start_actors, stop_actors, wait_started
    from cluster.models import check_models
    from learner.weight_sync import TRANSPORTS

    need, have = params * BYTES_PER_PARAM_NEEDED, _mem_available()
    if need > have:
        return {"name": name, "params": params, "skipped": f"needs ~{need / 2**30:.1f} GiB of RAM, "
                                                           f"{have / 2**30:.1f} GiB available"}
    m, d = cfg.models, cfg.data
    pair = check_models(m.teacher, m.student, d.max_prompt_tokens, d.max_response_tokens)
    student = rollout_factory(cfg, pair)("student", 0)
    wait_started([student], f"the {name} student actor", cfg.ray.actor_timeout_s)
    actors = None
    try:
        actors = start_actors(cfg, pair, Rollouts([student], [], Rollouts.settings_of(cfg)))
        floor = ray.get(actors.learners[0].__ray_call__.remote(_memcpy_seconds, cfg.rollout.dtype, repeats))
        log(f"(b) {name}: {params / 1e6:.0f}M parameters, memcpy {floor['seconds']:.3f} s")
        transports = {t: _transport_runs(cfg, actors, t, repeats, log) for t in TRANSPORTS}
        split = _object_store_split(cfg, actors, repeats)
    finally:
        if actors is not None:
            stop_actors(actors)
        ray.kill(student)
    for t in transports.values():
        if "push_s" in t:
            t["ratio_to_memcpy"] = t["push_s"] / floor["seconds"]
    return {"name": name, "params": params, "bytes": floor["bytes"], "memcpy_s": floor["seconds"],
            "memcpy_threads": floor["threads"], "transports": transports, "object_store_split": split}


def measure_push(cfg_for: Callable[[str], Any], sizes: dict[str, int], repeats: int,
                 log: Callable[[str], None] = print) -> dict:
    """Part (b) for every model of ``sizes`` (name -> parameters); ``cfg_for(name)`` is the job
    config with that model as the student. Target: push within 3x of one memcpy at >= 100M."""
    results = [measure_size(cfg_for(name), name, n, repeats, log) for name, n in sizes.items()]
    best = {r["name"]: min((t["ratio_to_memcpy"] for t in r["transports"].values() if "ratio_to_memcpy" in t),
                           default=float("inf"))
            for r in results if r["params"] >= 100e6 and "transports" in r}
    return {"sizes": results, "repeats": repeats, "target": 3.0, "best_ratio_at_100M_up": best,
            "met": bool(best) and max(best.values()) <= 3.0,
            "judged_on": "the best transport, at every size of at least 100M parameters"}
