"""The driver's side of the weight push: one object owns the transport, its fallback and what a
restarted student loads.

``WeightPush`` is the one place that knows which transport the job pushes with: ``weight_push_for``
looks ``learner.weight_transport`` up in ``ROUTES`` once, and every push goes through that
``Route``; nothing else branches on the transport. A route makes one transport's actor calls;
the learner's and the rollout actor's sides of the same transport are in ``learner.weight_sync``
(``TRANSPORTS``, under the same name).
- ``ObjectStoreRoute``: every learner rank exports (rank 0 packs the buckets; under ZeRO-3 every
  rank takes part in the gathers), rank 0's buckets stay in Ray's object store, and each
  student's ``load_weights`` of them is queued. A student runs its calls in order, so anything
  asked of it after the push sees the new weights. The default, and every push's fallback.
- ``CollectiveRoute``: learner rank 0 broadcasts each bucket on a side-band group while the
  students receive (``receive_weights``); the push returns when both are done. The group is
  formed first whenever its members changed (a new job, a restarted student).

A route that cannot deliver a push raises ``TransportFailed``, and ``WeightPush`` sends that push
through the object store instead: a push never fails for its transport's sake. A lost learner
rank fails the job (``ActorLostError``), whatever the transport. A restarted student always
starts from an object-store payload (``payload_for_restart``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol

import ray

from cluster import logs
from cluster.actors import Actors
from cluster.config import JobConfig
from cluster.errors import first_line
from cluster.waiting import Waiter
from learner.collectives import collective_backend
from services.actor_names import actor_name

RANK0 = actor_name("learner", 0)  # the learner rank that exports, and hosts the side band


class TransportFailed(RuntimeError):
    """A route could not deliver a push: the message says why (one part per member that failed),
    ``then`` what the route does about it at its next push. The push falls back to the object store."""

    def __init__(self, reasons: list[str], then: str):
        super().__init__("; ".join(reasons))
        self.then = then


class Route(Protocol):
    """The driver's side of one transport (see the module docstring)."""

    name: str  # its key in ROUTES, learner.weight_transport and learner.weight_sync.TRANSPORTS

    def push(self, version: int) -> Any:
        """Send the learner's current weights to every student as ``version``, waiting as the
        transport needs (within ray.actor_timeout_s). Returns the object-store payload to keep
        for restarted students, or None when the transport keeps none. Raises TransportFailed
        (its own state cleaned up) when it could not deliver, ActorLostError when a learner rank
        is lost."""

    def close(self) -> None:
        """Release what the route holds from push to push; never waits on an actor."""


class ObjectStoreRoute:
    """Rank 0's buckets through Ray's object store: the default transport and every fallback."""

    name = "object_store"

    def __init__(self, cfg: JobConfig, actors: Actors, waiter: Waiter):
        self.cfg, self.actors, self.waiter = cfg, actors, waiter

    def push(self, version: int) -> Any:
        """``send`` to every student, then wait until rank 0's buckets are stored (not fetched
        here): the learner's side of the push, which its next step waits behind anyway; the
        students load it in the background. Returns the payload; never raises TransportFailed."""
        payload = self.send(version, everyone=True)
        ray.wait([payload], timeout=self.cfg.ray.actor_timeout_s, fetch_local=False)
        return payload

    def send(self, version: int, everyone: bool) -> Any:
        """Export the learner's weights (every rank) and queue their load as ``version`` on every
        student (``everyone``) or on none; returns rank 0's payload (an ObjectRef), which Ray hands
        to the students without the driver, without waiting for it to be stored."""
        lc = self.cfg.learner
        refs = [l.export_weights.remote(self.name, lc.bucket_mib, self.cfg.rollout.dtype)
                for l in self.actors.learners]
        self.waiter.wait(refs[1:], self.actors.learner_names()[1:])  # they only took part in the gathers
        for student in self.actors.students if everyone else []:
            student.load_weights.remote(refs[0], version)
        return refs[0]

    def close(self) -> None:
        """Nothing to release: the payload is the push object's."""


class CollectiveRoute:
    """Learner rank 0 broadcasts on a side-band group of its own with the students."""

    name = "collective"

    def __init__(self, cfg: JobConfig, actors: Actors, waiter: Waiter):
        self.cfg, self.actors, self.waiter = cfg, actors, waiter
        self.members: Optional[list] = None  # the students in the side band, None: no group

    def push(self, version: int) -> None:
        """One push over the side band, forming the group first if its members changed. On any
        failure the group is dropped (learner rank 0 leaves it) and TransportFailed raised; the
        next push forms it again. Keeps no payload."""
        students = list(self.actors.students)
        errors = [] if self.members == students else self._form_group(students)
        if not errors:
            lc = self.cfg.learner
            refs = [l.export_weights.remote(self.name, lc.bucket_mib, self.cfg.rollout.dtype)
                    for l in self.actors.learners]
            receives = [s.receive_weights.remote(version) for s in students]
            errors = self._side_band(refs, self.actors.learner_names(), receives)
        if errors:
            self.members = None
            self.waiter.wait(self.actors.learners[0].close_weight_group.remote(), RANK0)
            raise TransportFailed(errors, then="the next push forms the group again")
        return None

    def _form_group(self, students: list) -> list[str]:
        """A new side-band group: learner rank 0 hosts a new store, everyone joins it at once.
        Returns what went wrong (empty: the group stands, with ``students`` as its members)."""
        rank0, timeout = self.actors.learners[0], self.side_band_timeout_s
        address = self.waiter.wait(rank0.open_weight_store.remote(timeout), RANK0)
        size = len(students) + 1
        backend = collective_backend(self.cfg.learner.device)
        joins = [s.join_weight_group.remote(address, i + 1, size, backend, timeout)
                 for i, s in enumerate(students)]
        errors = self._side_band([rank0.join_weight_group.remote(size, timeout)], [RANK0], joins)
        self.members = None if errors else students
        return errors

    @property
    def side_band_timeout_s(self) -> float:
        """The side band's own timeout: half of ray.actor_timeout_s, so that a student that
        hangs fails the side band (which falls back) well before the learner wait gives up."""
        return self.cfg.ray.actor_timeout_s / 2

    def _side_band(self, learner_refs: list, names: list[str], student_refs: list) -> list[str]:
        """Wait for one side-band step; returns what went wrong (empty: all well).

        A lost or silent learner rank fails the job (``Waiter.wait``); a student's failure is only
        reported: the push falls back to the object store, and the supervisor restarts a
        student that is gone when its next request fails.
        """
        deadline = time.time() + self.cfg.ray.actor_timeout_s
        results = self.waiter.wait(learner_refs, names)
        errors = [r.get("error") if isinstance(r, dict) else r for r in results]
        errors = [e for e in errors if e]
        for i, ref in enumerate(student_refs):
            try:
                ray.get(ref, timeout=max(0.0, deadline - time.time()))
            except ray.exceptions.RayError as err:
                errors.append(f"{actor_name('student', i)}: {first_line(err)}")
        return errors

    def close(self) -> None:
        """Ask learner rank 0 and the members to leave the side band, without waiting: they may
        be gone, or about to be stopped. Shared students (a sweep) are then in no group."""
        members, self.members = self.members, None
        if members is None:
            return
        self.actors.learners[0].close_weight_group.remote()
        for student in members:
            student.leave_weight_group.remote()


ROUTES: dict[str, Callable[[JobConfig, Actors, Waiter], Route]] = {
    "object_store": ObjectStoreRoute, "collective": CollectiveRoute}


@dataclass(frozen=True)
class Pushed:
    """One push as it went: the version, the transport that delivered it (the object store
    when the configured one fell back), and the wall seconds the driver waited on it."""

    version: int
    transport: str
    seconds: float


class WeightPush:
    """Every weight push of a job, and the weights a restarted student loads first.

    ``route`` is the configured transport's driver side, ``object_store`` the fallback (and the
    restarted students' source); ``learner_step()`` is the learner's current step. The push
    keeps the weight version the students hold (``version``; a resumed job sets its own), the
    learner step those weights are from (``pushed_at``), the pushes made (``pushes``), the last
    push's wall time (``seconds``) and the newest object-store payload (``payload``, None when
    the last push kept none).
    """

    def __init__(self, route: Route, object_store: ObjectStoreRoute, learner_step: Callable[[], int],
                 log: Callable[[str], None] = logs.info):
        self.route, self.object_store = route, object_store
        self.learner_step, self.log = learner_step, log
        self.version = 0
        self.pushed_at = -1
        self.pushes = 0
        self.seconds: Optional[float] = None
        self.payload: Any = None

    def push(self, version: Optional[int] = None) -> Pushed:
        """Send the learner's current weights to every student as ``version`` (default: the next)
        and wait as the transport needs (``Route.push``). A push the transport could not deliver
        is logged and goes through the object store. Afterwards the students hold ``version``."""
        version = self.version + 1 if version is None else version
        t0, route = time.perf_counter(), self.route
        try:
            self.payload = route.push(version)
        except TransportFailed as err:
            self.log(f"{route.name} weight push of version {version} failed ({err}); it goes "
                     f"through the object store, and {err.then}")
            route = self.object_store
            self.payload = route.push(version)
        self.seconds = time.perf_counter() - t0
        self.pushes += 1
        self.version, self.pushed_at = version, self.learner_step()
        return Pushed(version, route.name, self.seconds)

    def payload_for_restart(self) -> tuple[Any, int]:
        """What a restarted student loads first: an object-store payload and its version.

        After an object-store push that is the push's own payload. When the last push kept none
        (the collective transport), the learner's weights go through the object store now: under
        the same version when the learner has not stepped since the last push, else as a new
        version that every student loads (a version names one set of weights). Not counted as a
        push.
        """
        if self.payload is None:
            step = self.learner_step()
            same = step == self.pushed_at
            version = self.version if same else self.version + 1
            self.payload = self.object_store.send(version, everyone=not same)
            self.version, self.pushed_at = version, step
        return self.payload, self.version

    def close(self) -> None:
        """End the job's pushes: the route releases what it holds and the payload is dropped (Ray
        may free rank 0's buckets). Waits on no actor."""
        self.route.close()
        self.payload = None


def weight_push_for(cfg: JobConfig, actors: Actors, waiter: Waiter, learner_step: Callable[[], int],
                    log: Callable[[str], None] = logs.info) -> WeightPush:
    """The job's weight push: the route ``learner.weight_transport`` names (its one lookup), with
    the object store behind it. ``actors``' lists may be replaced in place (restarts)."""
    name = cfg.learner.weight_transport
    if name not in ROUTES:
        raise ValueError(f"learner.weight_transport: unknown transport {name!r}; "
                         f"choose one of {sorted(ROUTES)}")
    route, fallback = ROUTES[name](cfg, actors, waiter), ObjectStoreRoute(cfg, actors, waiter)
    return WeightPush(route, fallback, learner_step, log)
