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
from services.actor_names import actor_name

T = TypeVar("T")


class ItemStream(Iterator[T]):
    """``items`` endlessly, a fresh seeded shuffle every epoch (each item once per epoch).

    Its position (epoch, index) is its whole state, so a resumed job continues the stream
    where the checkpoint left it: ``state()`` / ``restore(state)``.
    """

    def __init__(self, items: list[T], seed: int):
        self.items, self.seed = items, seed
        self.epoch, self.index = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.items))

    def __next__(self) -> T:
        if self.index == len(self._order):
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        self.index += 1
        return self.items[self._order[self.index - 1]]

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def restore(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._permutation(self.epoch)


def item_stream(items: list[T], seed: int) -> ItemStream[T]:
    return ItemStream(items, seed)


def prompt_stream(prompts: list[Prompt], seed: int) -> ItemStream[tuple[int, list[int]]]:
    """Endless (prompt_id, ids), a fresh seeded shuffle every epoch."""
    return ItemStream([(p.prompt_id, p.ids) for p in prompts], seed)


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
class Request:
    """One rollout request: enough to send it again if an actor it ran on is lost."""

    source: str                 # "student", "teacher" or "dataset": the rows it makes
    index: int                  # the actor that generates them (student i, or teacher i)
    items: list                 # the prompts (or reference rows) it was given
    scorer: Optional[int] = None  # the teacher that scores a student request
    sent_to: tuple = ()         # the actor handles it was last sent to (actor_names' order)

    @property
    def rows(self) -> int:
        return len(self.items)

    @property
    def maker(self) -> str:
        """The actor whose rows these are: the student that samples, or the teacher that
        samples (or scores the reference rows)."""
        return actor_name("student" if self.source == "student" else "teacher", self.index)

    def actor_names(self) -> list[str]:
        if self.source == "student":
            return [actor_name("student", self.index), actor_name("teacher", self.scorer)]
        return [actor_name("teacher", self.index)]


@dataclass
class RolloutPump:
    students: list
    teachers: list
    buffer: Any
    stream: ItemStream  # endless prompts
    references: Optional[ItemStream] = None  # dataset off-policy rows
    batch_size: int = 64  # most prompts per request (rollout.prompts_per_batch)
    supervisor: Any = None  # cluster.supervisor.Supervisor: restarts lost actors (None: errors raise)
    timeout_s: float = 600.0  # longest wait for one request (ray.actor_timeout_s)
    inflight: dict = field(default_factory=dict)  # ObjectRef -> Request
    tokens: int = 0  # response tokens of every row made, a resumed job's earlier ones included
    tokens_at_start: int = 0  # ``tokens`` when this process's clock (``started``) began
    actor_tokens: dict = field(default_factory=dict)  # "student-0" -> response tokens of its rows
    rows: dict = field(default_factory=lambda: {"student": 0, "teacher": 0, "dataset": 0})
    started: float = field(default_factory=time.time)
    last_seen: dict = field(default_factory=dict)  # "student-0" -> time of its last finished request
    _next_teacher: int = 0

    def _scorer(self) -> int:
        self._next_teacher += 1
        return (self._next_teacher - 1) % len(self.teachers)

    def top_up(self, demand: "Demand") -> None:
        """Launch requests on idle actors, each sized by ``demand`` (see the module docstring)."""
        have = ray.get(self.buffer.available.remote(demand.min_version), timeout=self.timeout_s)
        for i in range(len(self.students)):
            n = min(demand.on_policy_rows(have["on_policy"], self._inflight_rows("student")),
                    self.batch_size)
            if n > 0 and not self._busy("student", i):
                self._send(Request("student", i, next_n(self.stream, n), self._scorer()))
        off_source = "dataset" if self.references else "teacher"
        for i in range(len(self.teachers)):
            n = min(demand.off_policy_rows(have["off_policy"], self._inflight_rows(off_source)),
                    self.batch_size)
            if n > 0 and not self._busy(off_source, i):
                self._send(Request(off_source, i, next_n(self.references or self.stream, n)))

    def _handles(self, req: Request) -> tuple:
        """The actors that would run ``req`` now, in ``req.actor_names()`` order."""
        if req.source == "student":
            return self.students[req.index], self.teachers[req.scorer]
        return (self.teachers[req.index],)

    def _send(self, req: Request) -> None:
        """Chain the request's tasks actor to actor; the driver only holds the last ref."""
        req.sent_to = self._handles(req)
        if req.source == "student":
            samples = self.students[req.index].sample.remote(req.items)
            rows = self.teachers[req.scorer].score_rows.remote(samples)
        elif req.source == "dataset":
            rows = self.teachers[req.index].score_references.remote(req.items)
        else:
            rows = self.teachers[req.index].sample_rows.remote(req.items)
        self.inflight[self.buffer.append.remote(rows)] = req

    def _busy(self, source: str, index: int) -> bool:
        return any((r.source, r.index) == (source, index) for r in self.inflight.values())

    def _inflight_rows(self, source: str) -> int:
        return sum(r.rows for r in self.inflight.values() if r.source == source)

    def wait_one(self) -> None:
        """Block until one request lands in the buffer (or is lost and sent again)."""
        if not self.inflight:
            raise RuntimeError("no rollout in flight and not enough rows to sample: "
                               "check buffer.on_policy_fraction against the rollout actors")
        done, _ = ray.wait(list(self.inflight), num_returns=1, timeout=self.timeout_s)
        if not done:
            names = sorted({n for r in self.inflight.values() for n in r.actor_names()})
            raise TimeoutError(f"no rollout request finished within ray.actor_timeout_s="
                               f"{self.timeout_s:.0f} s; waiting on {', '.join(names)}")
        self._collect(done)

    def poll(self) -> None:
        """Account for any requests that finished, without blocking."""
        if self.inflight:
            done, _ = ray.wait(list(self.inflight), num_returns=len(self.inflight), timeout=0)
            self._collect(done)

    def _collect(self, done: list) -> None:
        for ref in done:
            req = self.inflight.pop(ref)
            try:
                result = ray.get(ref)  # raises the actor's error, with its traceback
            except ray.exceptions.RayActorError as err:
                if self.supervisor is None:
                    raise
                # Restart whichever of its actors died (or fail the job past the limit), then
                # send the same prompts again: no request is lost with its actor. A request sent
                # to an actor that has been replaced since died with it: that death was handled
                # already (by the first request to fail), so it is only sent again.
                if all(a is b for a, b in zip(req.sent_to, self._handles(req))):
                    self.supervisor.recover(req.actor_names(), err)
                self._send(req)
                continue
            now = time.time()
            for name in req.actor_names():
                self.last_seen[name] = now
            self.tokens += result["tokens"]
            self.actor_tokens[req.maker] = self.actor_tokens.get(req.maker, 0) + result["tokens"]
            self.rows[req.source] += result["rows"]

    def usage(self, served: dict[str, int]) -> dict[str, dict]:
        """Per source: rows generated, row-uses trained on and their ratio (want <= 1.2)."""
        return {src: {"generated": self.rows[src], "trained": served.get(src, 0),
                      "ratio": round(self.rows[src] / served[src], 3) if served.get(src) else None}
                for src in self.rows if self.rows[src] or served.get(src)}

    def tokens_per_s(self) -> float:
        """Response tokens per second since this process started the pump (after a resume,
        only the tokens made since: the earlier run's tokens were made on an earlier clock)."""
        return (self.tokens - self.tokens_at_start) / max(time.time() - self.started, 1e-9)

    def actor_tokens_per_s(self) -> dict[str, float]:
        """Per rollout actor that made rows: response tokens of its rows per second since the
        pump started (the same clock as ``tokens_per_s``; not kept across a resume)."""
        elapsed = max(time.time() - self.started, 1e-9)
        return {name: n / elapsed for name, n in self.actor_tokens.items()}

    def drain(self) -> None:
        """Wait for every in-flight request (before a checkpoint, the final push and evaluation)."""
        while self.inflight:
            self.wait_one()

    def state(self) -> dict:
        """What a checkpoint keeps (taken after ``drain``: nothing is in flight)."""
        return {"stream": self.stream.state(),
                "references": self.references.state() if self.references else None,
                "rows": dict(self.rows), "tokens": self.tokens, "next_teacher": self._next_teacher}

    def restore(self, state: dict) -> None:
        self.stream.restore(state["stream"])
        if self.references and state["references"]:
            self.references.restore(state["references"])
        self.rows.update(state["rows"])
        self.tokens, self._next_teacher = state["tokens"], state["next_teacher"]
        self.tokens_at_start = self.tokens
