"""Keeping the job's actors accountable: restarts of lost rollout actors, liveness from answers.

``Supervisor.recover`` is called when a rollout request fails because an actor died. It asks
each actor the request touched for a real answer (``ping``); every one that does not answer
is replaced by a fresh actor built with the job's own settings, which a student then loads
with the current weights under the current version. More than ``max_restarts`` restarts of
one actor within ``window_s`` seconds fail the job with a message that names the actor and
its last error. A request that failed while all its actors still answer cannot be blamed on a
rollout actor (the buffer died, say), so it fails the job too.

``Supervisor.probe`` keeps liveness honest: on every call it sends a ``ping`` to each actor
with none outstanding and reads the answers that arrived (never waiting), so ``last_seen_s``
is the time since the actor itself last answered, and a dead actor shows as dead.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import ray

from cluster import logs
from cluster.errors import first_line
from cluster.events import EventLog
from cluster.waiting import ActorLostError
from services.actor_names import BUFFER, actor_name, parse_actor_name


@dataclass
class Supervisor:
    actors: Any                                   # cluster.actors.Actors (lists are replaced in place)
    make_rollout: Callable[[str, int], Any]       # (role, index) -> a started (not yet ready) actor
    weights: Callable[[], tuple[Any, int]]        # WeightPush.payload_for_restart: a payload, its version
    max_restarts: int = 3
    window_s: float = 3600.0
    timeout_s: float = 600.0
    log: Callable[[str], None] = logs.info
    how_to_resume: Callable[[], str] = lambda: ""  # appended to a failure (Trainer.how_to_resume)
    restarts: dict = field(default_factory=dict)    # name -> deque of restart times in the window
    total: dict = field(default_factory=dict)       # name -> restarts over the whole job
    last_error: dict = field(default_factory=dict)  # name -> text of its last error
    seen: dict = field(default_factory=dict)        # name -> time of its last answer
    pids: dict = field(default_factory=dict)        # name -> process id it last answered from
    dead: set = field(default_factory=set)
    _pings: dict = field(default_factory=dict)      # ObjectRef -> name
    events: Optional[EventLog] = None               # where restarts are kept for the whole job

    # -- who is who ---------------------------------------------------------------------------
    def handles(self) -> dict[str, Any]:
        a = self.actors
        named = {actor_name(role, i): h for role, group in (("student", a.students), ("teacher", a.teachers),
                                                             ("learner", a.learners))
                 for i, h in enumerate(group)}
        named[BUFFER] = a.buffer
        return named

    @staticmethod
    def kind(name: str) -> str:
        return parse_actor_name(name)[0]

    # -- restarts -----------------------------------------------------------------------------
    def recover(self, names: list[str], err: BaseException) -> list[str]:
        """Restart those of ``names`` that no longer answer; returns the restarted names."""
        handles = self.handles()
        # Each actor's own answer says why it is gone: the request's error may name another
        # actor's task (a teacher scoring rows whose student died, say).
        lost = {n: why for n in names if (why := self._ping_error(handles[n])) is not None}
        if not lost:
            raise ActorLostError(f"a rollout request failed but its actors ({', '.join(names)}) still "
                                 f"answer, so the replay buffer is the likely loss: {first_line(err)}. "
                                 f"{self.how_to_resume()}")
        for name, why in lost.items():
            self.restart(name, why)
        return list(lost)

    def restart(self, name: str, why: str) -> None:
        """Replace rollout actor ``name``, lost because of ``why`` (its own error, one line)."""
        role, index = parse_actor_name(name)
        now = time.time()
        self.last_error[name] = why
        recent = self.restarts.setdefault(name, deque())
        while recent and now - recent[0] > self.window_s:
            recent.popleft()
        if len(recent) >= self.max_restarts:
            raise ActorLostError(
                f"rollout actor {name} died {len(recent) + 1} times within {self.window_s:.0f} s "
                f"(rollout.max_restarts={self.max_restarts}); its last error: {self.last_error[name]}. "
                f"{self.how_to_resume()}")
        recent.append(now)
        self.total[name] = self.total.get(name, 0) + 1
        self.log(f"{name} died ({self.last_error[name]}); restarting it "
                 f"({len(recent)} of {self.max_restarts} restarts allowed per {self.window_s:.0f} s)")
        group = self.actors.students if role == "student" else self.actors.teachers
        try:
            ray.kill(group[index])  # a hung process is put down before its place is taken
        except Exception:  # noqa: BLE001 - it is already gone
            pass
        fresh = self.make_rollout(role, index)
        ray.get(fresh.health.remote(), timeout=self.timeout_s)
        if role == "student":
            # Always an object-store payload, whatever the transport: a fresh actor is in no side
            # band, and forming a group of every student here would hang on any other student in
            # trouble. WeightPush.payload_for_restart exports one when the last push kept none; the
            # next collective push forms the group again, with this actor in it.
            payload, version = self.weights()
            ray.get(fresh.load_weights.remote(payload, version), timeout=self.timeout_s)
        group[index] = fresh
        # A ping sent to the old actor is still pending and would fail: read later by probe(),
        # it marked the new actor dead (with the old pid) while the new one worked.
        self._pings = {ref: n for ref, n in self._pings.items() if n != name}
        self.pids.pop(name, None)  # the new process's pid comes with its first answer
        self.dead.discard(name)
        self.seen[name] = time.time()
        self.log(f"{name} restarted" + (f" with weight version {version}" if role == "student" else ""))
        if self.events is not None:
            self.events.record("restart", actor=name, reason=why)

    def _ping_error(self, handle: Any) -> Optional[str]:
        """None if the actor answers a ping, else why not (one line)."""
        wait = min(self.timeout_s, 30.0)
        try:
            ray.get(handle.ping.remote(), timeout=wait)
            return None
        except ray.exceptions.RayActorError as err:
            return first_line(err)
        except ray.exceptions.GetTimeoutError:
            return f"no answer to a ping within {wait:.0f} s"

    # -- liveness -----------------------------------------------------------------------------
    def probe(self) -> None:
        """Read the pings that came back and send new ones; never blocks."""
        if self._pings:
            done, _ = ray.wait(list(self._pings), num_returns=len(self._pings), timeout=0)
            for ref in done:
                name = self._pings.pop(ref)
                try:
                    answer = ray.get(ref)
                    self.seen[name] = time.time()
                    if isinstance(answer, dict) and "pid" in answer:
                        self.pids[name] = answer["pid"]
                except ray.exceptions.RayActorError as err:
                    self.dead.add(name)
                    self.last_error[name] = first_line(err)
        waiting = set(self._pings.values())
        for name, handle in self.handles().items():
            if name not in waiting and name not in self.dead:
                self._pings[handle.ping.remote()] = name

    def health(self) -> dict[str, dict]:
        """Per actor: state, seconds since its last answer, restarts and last error."""
        now = time.time()
        return {name: {"kind": self.kind(name),
                       "state": "dead" if name in self.dead else ("alive" if name in self.seen else "starting"),
                       "last_seen_s": round(now - self.seen[name], 1) if name in self.seen else None,
                       "restarts": self.total.get(name, 0),
                       "last_error": self.last_error.get(name), "pid": self.pids.get(name)}
                for name in self.handles()}

    def restart_counts(self) -> dict[str, int]:
        return dict(self.total)
