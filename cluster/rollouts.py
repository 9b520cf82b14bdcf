"""Keeping rollouts flowing into the replay buffer while the learner trains.

Each request is a chain of Ray tasks that the driver never waits on directly:
  student.sample(prompts) -> teacher.score_rows(samples) -> buffer.append(rows)    (on-policy)
  teacher.sample_rows(prompts) -> buffer.append(rows)                              (off-policy)
  teacher.score_references(file rows) -> buffer.append(rows)       (off-policy, rollout.off_policy=dataset)
Ray passes the intermediate results actor to actor. The driver keeps at most one request in
flight per actor and sizes each request by what the learner will consume (``Demand``):
- never more rows of a source than the remaining steps will train on, counting the rows
  already usable and those in flight;
- on-policy rows, never more than the learner will take before they go stale: a row sampled
  now under version v is usable until the learner pushes version v + max_staleness + 1, so
  for ``window`` more steps. The buffer serves the oldest version first, so every row
  generated within that bound is trained on before it expires;
- off-policy rows (no staleness) up to ``ahead`` steps ahead.
So rows generated / rows trained on stays near 1 for each source (``RolloutPump.usage``).
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


def item_stream(items: list[T], seed: int) -> Iterator[T]:
    """``items`` endlessly, a fresh seeded shuffle every epoch (each item once per epoch)."""
    rng = np.random.default_rng(seed)
    for _ in itertools.count():
        for i in rng.permutation(len(items)):
            yield items[i]


def prompt_stream(prompts: list[Prompt], seed: int) -> Iterator[tuple[int, list[int]]]:
    """Endless (prompt_id, ids), a fresh seeded shuffle every epoch."""
    return item_stream([(p.prompt_id, p.ids) for p in prompts], seed)


def next_n(stream: Iterator[T], n: int) -> list[T]:
    return list(itertools.islice(stream, n))


@dataclass(frozen=True)
class Demand:
    """What the learner will still consume, seen at one moment of the job.

    ``per_step_on`` / ``per_step_off``: rows of each kind one learner step trains on;
    ``uses_on`` / ``uses_off``: times a row may be trained on (buffer.*_uses); ``steps_left``:
    learner steps still to run; ``window``: steps an on-policy row sampled now stays fresh;
    ``ahead``: steps of off-policy rows to keep ready. Supplies are counted in servings (a row
    with two uses left is two servings).
    """

    per_step_on: int
    per_step_off: int
    steps_left: int
    window: int
    min_version: int
    uses_on: int = 1
    uses_off: int = 1
    ahead: int = 8

    def on_policy_rows(self, servings: int, inflight_rows: int) -> int:
        """Rows a student request may ask for, given usable servings and rows in flight."""
        want = self.per_step_on * min(self.window, self.steps_left)
        return _rows_for(want - servings - inflight_rows * self.uses_on, self.uses_on)

    def off_policy_rows(self, servings: int, inflight_rows: int) -> int:
        want = self.per_step_off * min(self.ahead, self.steps_left)
        return _rows_for(want - servings - inflight_rows * self.uses_off, self.uses_off)


def _rows_for(servings: int, uses: int) -> int:
    return max(0, -(-servings // uses))  # ceil: the last row may serve fewer times than allowed


@dataclass
class RolloutPump:
    students: list
    teachers: list
    buffer: Any
    stream: Iterator[tuple[int, list[int]]]  # endless prompts (``item_stream``)
    references: Optional[Iterator[tuple[int, list[int], list[int]]]] = None  # dataset off-policy rows
    batch_size: int = 64  # most prompts per request (rollout.prompts_per_batch)
    inflight: dict = field(default_factory=dict)  # ObjectRef -> (source, actor index, rows asked)
    tokens: int = 0
    rows: dict = field(default_factory=lambda: {"student": 0, "teacher": 0, "dataset": 0})
    started: float = field(default_factory=time.time)
    last_seen: dict = field(default_factory=dict)  # "student-0" -> time of its last finished request
    dead: set = field(default_factory=set)
    _next_teacher: int = 0

    def _scorer(self):
        teacher = self.teachers[self._next_teacher % len(self.teachers)]
        self._next_teacher += 1
        return teacher

    def top_up(self, demand: "Demand") -> None:
        """Launch requests on idle actors, each sized by ``demand`` (see the module docstring)."""
        have = ray.get(self.buffer.available.remote(demand.min_version))
        for i, student in enumerate(self.students):
            n = min(demand.on_policy_rows(have["on_policy"], self._inflight_rows("student")),
                    self.batch_size)
            if n > 0 and not self._busy("student", i):
                samples = student.sample.remote(next_n(self.stream, n))
                rows = self._scorer().score_rows.remote(samples)
                self._launch(self.buffer.append.remote(rows), "student", i, n)
        off_source = "dataset" if self.references else "teacher"
        for i, teacher in enumerate(self.teachers):
            n = min(demand.off_policy_rows(have["off_policy"], self._inflight_rows(off_source)),
                    self.batch_size)
            if n > 0 and not self._busy(off_source, i):
                rows = (teacher.score_references.remote(next_n(self.references, n)) if self.references
                        else teacher.sample_rows.remote(next_n(self.stream, n)))
                self._launch(self.buffer.append.remote(rows), off_source, i, n)

    def _launch(self, ref, source: str, index: int, rows: int) -> None:
        self.inflight[ref] = (source, index, rows)

    def _busy(self, source: str, index: int) -> bool:
        return any(v[:2] == (source, index) for v in self.inflight.values())

    def _inflight_rows(self, source: str) -> int:
        return sum(v[2] for v in self.inflight.values() if v[0] == source)

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
            source, index, _ = self.inflight.pop(ref)
            name = f"{'student' if source == 'student' else 'teacher'}-{index}"
            try:
                result = ray.get(ref)  # raises the actor's error, with its traceback
            except ray.exceptions.RayActorError:
                self.dead.add(name)
                raise
            self.last_seen[name] = time.time()
            self.tokens += result["tokens"]
            self.rows[source] += result["rows"]

    def usage(self, served: dict[str, int]) -> dict[str, dict]:
        """Per source: rows generated, row-uses trained on and their ratio (want <= 1.2)."""
        return {src: {"generated": self.rows[src], "trained": served.get(src, 0),
                      "ratio": round(self.rows[src] / served[src], 3) if served.get(src) else None}
                for src in self.rows if self.rows[src] or served.get(src)}

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
