"""The job's event log: ``runs/<name>/logs/events.jsonl``, one JSON line per event.

A job may run as several processes (a driver killed and ``--resume``d, a job failed by a lost
learner rank and resumed), and each process knows only its own restarts. What the report must
hold for the whole job (every rollout actor restart, every resume, every row the buffer could
not recover) is appended here as it happens, flushed and fsynced, and summed at the end.
A new (not resumed) job sets an earlier run's log aside with its checkpoints.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


class EventLog:
    """Append-only JSON lines; a line cut off by a kill mid-write is skipped on reading."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "logs" / "events.jsonl"

    def record(self, kind: str, **fields: Any) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"time": time.time(), "kind": kind, **fields}, default=str)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                out.append(event)
        return out


def summary(events: list[dict[str, Any]]) -> dict[str, Any]:
    """What the report says of the whole job: restarts per actor, the resumes (with the step
    each continued from) and every buffer recovery problem, over all of the job's processes."""
    restarts: dict[str, int] = {}
    for e in events:
        if e.get("kind") == "restart":
            restarts[str(e.get("actor"))] = restarts.get(str(e.get("actor")), 0) + 1
    return {"restarts": restarts,
            "resumes": [{"from": e.get("checkpoint"), "step": e.get("step")} for e in events
                        if e.get("kind") == "resume"],
            "failures": [e.get("error") for e in events if e.get("kind") == "failed"],
            "recovery_problems": [p for e in events if e.get("kind") == "recovery"
                                  for p in e.get("problems", [])]}
