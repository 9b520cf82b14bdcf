"""The driver's weight push (cluster.weight_push): which route a job's config picks, and what
``WeightPush`` does with a push that its transport could not deliver and with a restarted student.

The routes are stand-ins here (``SideBand`` and ``Store`` below, each saying what it replaces):
the real ones make Ray calls on DeepSpeed learner ranks and vLLM student actors, which a unit
test cannot start. What is under test is the push object's own part: the fallback to the object
store, the payload it keeps, the versions it hands out, and its metrics. The real routes, with
real actors, a real side band and a real fallback, run in tests/integration/test_weight_push.py.
"""
import typing

import pytest

from cluster.actors import Actors, Rollouts
from cluster.config import LearnerConfig, build_config
from cluster.waiting import Waiter
from cluster.weight_push import (ROUTES, CollectiveRoute, ObjectStoreRoute, Pushed, TransportFailed, WeightPush,
                                 weight_push_for)
from learner.weight_sync import TRANSPORTS


class SideBand:
    """Stands in for ``CollectiveRoute``, whose push needs learner rank 0 and the students in a
    gloo group: it delivers (keeping no payload, as the collective does) or, once ``down``, fails
    the way a side band with a lost member does (``TransportFailed``, one reason per member)."""

    name = "collective"

    def __init__(self):
        self.down, self.pushed, self.closed = False, [], False

    def push(self, version):
        if self.down:
            raise TransportFailed(["student-1: RayActorError: the actor died"],
                                  then="the next push forms the group again")
        self.pushed.append(version)
        return None

    def close(self):
        self.closed = True


class Store:
    """Stands in for ``ObjectStoreRoute``, whose push needs the learner ranks' exports in Ray's
    object store: each export is a numbered payload, recorded with its version and whether every
    student was asked to load it."""

    name = "object_store"

    def __init__(self):
        self.sent = []  # (version, everyone)

    def send(self, version, everyone):
        self.sent.append((version, everyone))
        return f"payload-{len(self.sent)}"

    def push(self, version):
        return self.send(version, everyone=True)

    def close(self):
        pass


def make_push():
    """A push over the stand-in side band; the learner's step is ``step[0]``, the log ``logs``."""
    side_band, store, step, logs = SideBand(), Store(), [0], []
    push = WeightPush(side_band, store, lambda: step[0], logs.append)
    return push, side_band, store, step, logs


# -- the one choice of transport ------------------------------------------------------------------

def test_every_transport_the_config_accepts_has_both_sides():
    accepted = set(typing.get_args(LearnerConfig.model_fields["weight_transport"].annotation))
    assert accepted == set(ROUTES) == set(TRANSPORTS)
    assert all(ROUTES[name].name == TRANSPORTS[name].name == name for name in accepted)


@pytest.mark.parametrize("transport, route", [("object_store", ObjectStoreRoute), ("collective", CollectiveRoute)])
def test_the_config_picks_the_route_and_the_object_store_stands_behind_it(transport, route):
    cfg = build_config({"learner": {"weight_transport": transport}})
    actors = Actors(None, Rollouts([], [], {}), [], None)
    push = weight_push_for(cfg, actors, Waiter(cfg.ray.actor_timeout_s), lambda: 0)
    assert type(push.route) is route and type(push.object_store) is ObjectStoreRoute
    assert (push.version, push.pushed_at, push.pushes, push.seconds, push.payload) == (0, -1, 0, None, None)


# -- pushes -----------------------------------------------------------------------------------------

def test_a_push_goes_over_the_side_band_and_keeps_no_payload():
    push, side_band, store, step, logs = make_push()
    pushed = push.push(0)
    assert pushed == Pushed(0, "collective", pushed.seconds) and push.seconds == pushed.seconds
    step[0] = 10
    pushed = push.push()  # the next version
    assert pushed.version == 1 and pushed.transport == "collective" and pushed.seconds >= 0
    assert side_band.pushed == [0, 1] and store.sent == [] and push.payload is None and not logs
    assert (push.version, push.pushed_at, push.pushes) == (1, 10, 2)


def test_a_failed_side_band_push_goes_through_the_object_store():
    push, side_band, store, step, logs = make_push()
    push.push(0)
    side_band.down, step[0] = True, 10
    pushed = push.push()
    assert pushed.transport == "object_store" and pushed.version == 1
    assert store.sent == [(1, True)] and push.payload == "payload-1"  # every student loads it
    assert logs == ["collective weight push of version 1 failed (student-1: RayActorError: the actor died); "
                    "it goes through the object store, and the next push forms the group again"]
    assert (push.version, push.pushed_at, push.pushes) == (1, 10, 2)  # a fallback is still one push
    # The side band works again: the next push uses it, and the fallback's payload is not kept.
    side_band.down, step[0] = False, 20
    assert push.push().transport == "collective" and push.payload is None and side_band.pushed == [0, 2]


# -- a restarted student's first load ---------------------------------------------------------------

def test_a_restarted_student_gets_the_object_store_payload_of_the_last_push():
    push, side_band, store, step, logs = make_push()
    side_band.down = True
    push.push(0)  # fell back: its payload is kept
    step[0] = 5  # the learner stepped since, but the students hold version 0 still
    assert push.payload_for_restart() == ("payload-1", 0)
    assert store.sent == [(0, True)] and push.version == 0


def test_a_restarted_student_after_a_side_band_push_gets_a_fresh_export_under_the_same_version():
    push, side_band, store, step, logs = make_push()
    step[0] = 4
    push.push(3)
    assert push.payload_for_restart() == ("payload-1", 3)
    assert store.sent == [(3, False)]  # the others hold these weights: nobody else loads them
    assert push.payload_for_restart() == ("payload-1", 3) and len(store.sent) == 1  # kept
    assert push.pushes == 1  # not counted as a push


def test_a_restarted_student_after_the_learner_stepped_gets_a_new_version_that_every_student_loads():
    push, side_band, store, step, logs = make_push()
    push.push(3)
    step[0] = 1
    assert push.payload_for_restart() == ("payload-1", 4)
    assert store.sent == [(4, True)]  # one version names one set of weights, on every student
    assert (push.version, push.pushed_at, push.pushes) == (4, 1, 1)
    push.push()  # the next push over the side band follows on
    assert side_band.pushed == [3, 5] and push.payload is None


def test_close_releases_the_route_and_the_payload():
    push, side_band, store, step, logs = make_push()
    side_band.down = True
    push.push(0)
    push.close()
    assert side_band.closed and push.payload is None
