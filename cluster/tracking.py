"""Experiment trackers: TensorBoard event files (on by default) and Weights & Biases (optional).

Two calls feed every tracker, so each holds exactly what the job reports:
- ``log_step(record)``: every learner step, with the record appended to ``Trainer.history``
  (``{"step": n, "loss": ..., "grad_norm": ..., "lr": ..., AMM's terms}``), under
  ``train/<key>``: these are ``report.json``'s ``history``;
- ``log_snapshot(step, snap)``: after each publish of the status snapshot, every sample of
  ``services.metrics.samples(snap)`` (what ``/metrics`` serves) under ``<metric>/<label=value,...>``,
  e.g. ``ammd_buffer_rows/source=student``.
TensorBoard stores each value as a double, so its scalars equal the report's to the last bit.

``start(cfg, run_dir, resumed)`` builds the trackers the config asks for. A tracker that
fails while the job runs (a full disk, W&B's server) is logged once and dropped: watching a job
must not end it.
"""
from __future__ import annotations

import importlib
import os
import uuid
from pathlib import Path
from typing import Any, Optional, Protocol

from cluster.config import ConfigError, JobConfig
from cluster.logs import get_logger
from cluster.run_dir import set_aside
from services.metrics import samples

FLUSH_SECS = 5  # how stale TensorBoard's view of a running job may be
WANDB_ID_FILE = "wandb-run-id"  # in the run dir: a resumed job continues the same W&B run

log = get_logger("tracking")


class Tracker(Protocol):
    def log_step(self, record: dict[str, float]) -> None: ...
    def log_snapshot(self, step: int, snap: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


def metric_tag(name: str, labels: dict[str, str]) -> str:
    """``ammd_loss``, ``{"term": "loss"}`` -> ``ammd_loss/term=loss``: one TensorBoard group per
    Prometheus family, one curve per label set."""
    if not labels:
        return name
    return name + "/" + ",".join(f"{key}={value}" for key, value in labels.items())


def step_scalars(record: dict[str, float]) -> dict[str, float]:
    """A history record's values by tag (``train/loss``, ...), ``step`` left out."""
    return {f"train/{key}": float(value) for key, value in record.items() if key != "step"}


def snapshot_scalars(snap: dict[str, Any]) -> dict[str, float]:
    """The ``/metrics`` samples of a snapshot by tag."""
    return {metric_tag(name, labels): value for name, labels, value in samples(snap)}


class TensorBoardTracker:
    """Event files in ``log_dir`` (torch's SummaryWriter)."""

    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = log_dir
        self.writer = SummaryWriter(str(log_dir), flush_secs=FLUSH_SECS)

    def resume(self, history: list[dict[str, float]], old_dir: Optional[Path]) -> None:
        """Start a resumed job's fresh directory with the steps its checkpoint holds: the
        checkpoint's ``history`` (complete, whatever the killed run had flushed) and, from
        ``old_dir``'s event files, the other summaries of those steps as they were written
        (values and wall times; a record cut short by the kill ends the copy). A fresh directory
        rather than TensorBoard's purge of orphaned steps, which only some of its readers
        apply: no reader sees a step twice."""
        from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

        for record in history:
            self.log_step(record)
        upto = int(history[-1]["step"]) if history else 0
        for path in sorted(old_dir.glob("events.out.tfevents.*")) if old_dir else []:  # by creation time
            for event in EventFileLoader(str(path)).Load():
                if event.HasField("summary") and event.step <= upto:
                    kept = [v for v in event.summary.value if not v.tag.startswith("train/")]
                    if kept:
                        del event.summary.value[:]
                        event.summary.value.extend(kept)
                        self.writer.file_writer.add_event(event, walltime=event.wall_time)  # not now()

    def _scalars(self, step: int, scalars: dict[str, float]) -> None:
        for tag, value in scalars.items():
            # new_style + double: a float64 tensor, not TensorBoard's float32 simple_value
            self.writer.add_scalar(tag, value, step, new_style=True, double_precision=True)

    def log_step(self, record: dict[str, float]) -> None:
        self._scalars(int(record["step"]), step_scalars(record))

    def log_snapshot(self, step: int, snap: dict[str, Any]) -> None:
        self._scalars(step, snapshot_scalars(snap))

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """One W&B run per job, named after it, with the resolved config; a resumed job continues
    the same run (its id is kept in ``<run_dir>/wandb-run-id``). W&B drops a step logged at or
    below one it already has, so the steps a resume runs again keep their first values."""

    def __init__(self, wandb: Any, project: str, cfg: JobConfig, run_dir: Path, resume: bool):
        id_file = run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else uuid.uuid4().hex[:12]
        run_dir.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id)
        self.wandb = wandb
        self.run = wandb.init(project=project, name=cfg.name, id=run_id, resume="allow",
                              dir=str(run_dir), config=cfg.model_dump())

    def log_step(self, record: dict[str, float]) -> None:
        self.run.log(step_scalars(record), step=int(record["step"]))

    def log_snapshot(self, step: int, snap: dict[str, Any]) -> None:
        self.run.log(snapshot_scalars(snap), step=step)

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """The job's trackers as one: each call goes to every tracker still working."""

    def __init__(self, trackers: dict[str, Tracker]):
        self.trackers = dict(trackers)

    def _each(self, call: str, *args: Any) -> None:
        for name, tracker in list(self.trackers.items()):
            try:
                getattr(tracker, call)(*args)
            except Exception as err:  # watching must not end the job
                log.warning(f"{name} tracking stopped: {call} failed ({type(err).__name__}: {err})")
                self.trackers.pop(name)

    def log_step(self, record: dict[str, float]) -> None:
        self._each("log_step", record)

    def log_snapshot(self, step: int, snap: dict[str, Any]) -> None:
        self._each("log_snapshot", step, snap)

    def close(self) -> None:
        self._each("close")
        self.trackers.clear()


def wandb_project(cfg: JobConfig) -> Optional[str]:
    """The W&B project the job logs to: ``tracking.wandb_project``, else ``WANDB_PROJECT``."""
    return cfg.tracking.wandb_project or os.environ.get("WANDB_PROJECT") or None


def _import_wandb() -> Any:
    return importlib.import_module("wandb")


def check(cfg: JobConfig) -> None:
    """ConfigError when W&B is asked for but cannot be imported (before anything starts)."""
    project = wandb_project(cfg)
    if project is None:
        return
    try:
        _import_wandb()
    except ImportError as err:
        where = ("tracking.wandb_project" if cfg.tracking.wandb_project else "the WANDB_PROJECT variable")
        raise ConfigError(f"{where} asks for W&B (project {project!r}) but wandb cannot be imported "
                          f"({err}): pip install wandb, or unset it") from None


def start(cfg: JobConfig, run_dir: Path, resumed: Optional[list[dict[str, float]]] = None) -> Trackers:
    """The trackers ``cfg.tracking`` asks for; ``resumed``: a resumed job's history as its
    checkpoint holds it (None for a new job). Logs one line saying where each one writes."""
    check(cfg)
    trackers: dict[str, Tracker] = {}
    said = []
    if cfg.tracking.tensorboard:
        tb_dir = run_dir / "tb"
        old = set_aside(tb_dir)  # a new job's curves must not mix with an older run's
        trackers["TensorBoard"] = tb = TensorBoardTracker(tb_dir)
        if resumed is not None:  # the checkpoint's steps, not the ones the killed run got past it
            try:
                tb.resume(resumed, old)
            except Exception as err:  # a damaged old file costs its curves, not the resume
                log.warning(f"TensorBoard: the earlier steps were not carried over from {old} ({err})")
        said.append(f"TensorBoard in {tb_dir} (tensorboard --logdir {tb_dir})")
    else:
        said.append("TensorBoard off (tracking.tensorboard)")
    project = wandb_project(cfg)
    if project is not None:
        trackers["W&B"] = WandbTracker(_import_wandb(), project, cfg, run_dir, resumed is not None)
        said.append(f"W&B project {project}")
    else:
        said.append("W&B off (set tracking.wandb_project or WANDB_PROJECT to log there)")
    log.info("tracking: " + "; ".join(said))
    return Trackers(trackers)


