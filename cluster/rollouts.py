"""Keeping rollouts flowing into the replay buffer while the learner trains.

Each request is a chain of Ray tasks that the driver never waits on directly:
  student.sample(prompts) -> teacher.score_rows(samples) -> buffer.append(rows)    (on-policy)
  teacher.sample_rows(prompts) -> buffer.append(rows)                              (off-policy)
  teacher.score_references(file rows) -> buffer.append(rows)       (off-policy, rollout.off_policy=dataset)
Ray passes the intermediate results actor to actor. The driver keeps at most one request in
flight per actor and launches one only while the buffer holds fewer usable rows than
``ahead`` learner steps need, so rollouts run ahead of the learner without flooding it.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, TypeVar

import numpy as np
import ray

from cluster.data import Prompt

T = TypeVar("T")


def batch_stream(items: list[T], batch_size: int, seed: int) -> Iterator[list[T]]:
    """Endless batches of ``items``, a fresh seeded shuffle every epoch."""
    rng = np.random.default_rng(seed)
    for _ in itertools.count():
        order = rng.permutation(len(items))
        for start in range(0, len(order), batch_size):
            yield [items[i] for i in order[start: start + batch_size]]


def prompt_stream(prompts: list[Prompt], batch_size: int, seed: int) -> Iterator[list[tuple[int, list[int]]]]:
    """Endless batches of (prompt_id, ids), a fresh seeded shuffle every epoch."""
    return batch_stream([(p.prompt_id, p.ids) for p in prompts], batch_size, seed)


@dataclass
class RolloutPump:
    students: list
    teachers: list
    buffer: Any
    stream: Iterator[list[tuple[int, list[int]]]]
    references: Optional[Iterator[list[tuple[int, list[int], list[int]]]]] = None  # dataset off-policy rows
    inflight: dict = field(default_factory=dict)  # ObjectRef -> (kind, actor index)
    tokens: int = 0
    rows: dict = field(default_factory=lambda: {"student": 0, "teacher": 0})
    started: float = field(default_factory=time.time)
    last_seen: dict = field(default_factory=dict)  # "student-0" -> time of its last finished request
    dead: set = field(default_factory=set)
    _next_teacher: int = 0

    def _busy(self, kind: str, index: int) -> bool:
        return any(v == (kind, index) for v in self.inflight.values())

    def _scorer(self):
        teacher = self.teachers[self._next_teacher % len(self.teachers)]
        self._next_teacher += 1
        return teacher

    def top_up(self, need_on: int, need_off: int, min_version: int, ahead: int = 3) -> None:
        """Launch requests on idle actors while fewer than ``ahead`` steps' rows are usable."""
        have = ray.get(self.buffer.available.remote(min_version))
        if need_on and have["on_policy"] < ahead * need_on:
            for i, student in enumerate(self.students):
                if not self._busy("student", i):
                    samples = student.sample.remote(next(self.stream))
                    rows = self._scorer().score_rows.remote(samples)
                    self.inflight[self.buffer.append.remote(rows)] = ("student", i)
        if need_off and have["off_policy"] < ahead * need_off:
            for i, teacher in enumerate(self.teachers):
                if not self._busy("teacher", i):
                    rows = (teacher.score_references.remote(next(self.references)) if self.references
                            else teacher.sample_rows.remote(next(self.stream)))
                    self.inflight[self.buffer.append.remote(rows)] = ("teacher", i)

    def wait_one(self, timeout: float = 600.0) -> None:
        """Block until one request lands in the buffer; re-raise its error if it failed."""
        if not self.inflight:
            raise RuntimeError("no rollout in flight and not enough rows to sample: "
                               "check buffer.on_policy_fraction against the rollout actors")
        done, _ = ray.wait(list(self.inflight), num_returns=1, timeout=timeout)
        if not done:
            raise TimeoutError(f"no rollout finished within {timeout:.0f} s")
        self._collect(done)

    def poll(self) -> None:
        """Account for any requests that finished, without blocking."""
        if self.inflight:
            done, _ = ray.wait(list(self.inflight), num_returns=len(self.inflight), timeout=0)
            self._collect(done)

    def _collect(self, done: list) -> None:
        for ref in done:
            kind, index = self.inflight.pop(ref)
            try:
                result = ray.get(ref)  # raises the actor's error, with its traceback
            except ray.exceptions.RayActorError:
                self.dead.add(f"{kind}-{index}")
                raise
            self.last_seen[f"{kind}-{index}"] = time.time()
            self.tokens += result["tokens"]
            self.rows[kind] += result["rows"]

    def health(self) -> dict[str, dict]:
        """Per rollout actor: alive/dead and seconds since its last finished request."""
        now = time.time()
        names = [f"student-{i}" for i in range(len(self.students))] + \
                [f"teacher-{i}" for i in range(len(self.teachers))]
        return {n: {"state": "dead" if n in self.dead else "alive",
                    "last_seen_s": round(now - self.last_seen[n], 1) if n in self.last_seen else None}
                for n in names}

    def tokens_per_s(self) -> float:
        return self.tokens / max(time.time() - self.started, 1e-9)

    def drain(self) -> None:
        """Wait for every in-flight request (before the final weight push and evaluation)."""
        while self.inflight:
            self.wait_one()
