"""The supervisor's restart rules on real Ray actors.

The rollout actor is replaced by ``Echo``, a Ray actor with the same four methods the
supervisor calls (ping, health, load_weights, and a request); starting vLLM for each of
the restarts below would cost minutes and test nothing more about the rules. The real rollout
actor's restart, killed by pid mid-job, is in test_job.py.
"""
import os
import signal
import time

import pytest
import ray

from cluster.supervisor import ActorLostError, Supervisor

pytestmark = pytest.mark.slow


class Answering:
    """The calls the supervisor makes of a rollout actor: ping (in its own thread, as the real
    actor's), health and load_weights (kept, so a test can read what was loaded)."""

    version = None

    @ray.method(concurrency_group="health")
    def ping(self):
        return {"pid": os.getpid(), "time": time.time()}

    def health(self):
        return {"pid": os.getpid()}

    def load_weights(self, payload, version):
        self.version = (payload, version)
        return version

    def loaded(self):
        return self.version


@ray.remote(num_cpus=0, concurrency_groups={"health": 1})
class Echo(Answering):
    pass


class Group:
    """What the supervisor needs of cluster.actors.Actors: the lists it replaces handles in."""

    def __init__(self, students, teachers):
        self.students, self.teachers, self.learners, self.buffer = students, teachers, [], Echo.remote()


def kill(handle):
    os.kill(ray.get(handle.ping.remote())["pid"], signal.SIGKILL)
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(handle.health.remote(), timeout=30)


def states(sup, until: str, within: float = 60.0) -> dict:
    """Probe until some actor reaches ``until`` (pings are answered asynchronously)."""
    deadline = time.time() + within
    while True:
        sup.probe()
        now = {n: h["state"] for n, h in sup.health().items()}
        if until in now.values() and (until != "alive" or set(now.values()) == {"alive"}) \
                or time.time() > deadline:
            return now
        time.sleep(0.2)


def test_lost_actors_are_replaced_loaded_and_limited(ray_cluster):
    group = Group([Echo.remote()], [Echo.remote()])
    made = []

    def make(role, index):
        made.append((role, index))
        return Echo.remote()

    logs = []
    sup = Supervisor(group, make, weights=lambda: ("weights-v3", 3), max_restarts=2, window_s=3600,
                     timeout_s=30, log=logs.append, how_to_resume=lambda: "resume with X")
    assert states(sup, "alive") == {"student-0": "alive", "teacher-0": "alive", "buffer": "alive"}

    old = group.students[0]
    kill(old)
    err = ray.exceptions.RayActorError()
    assert sup.recover(["student-0", "teacher-0"], err) == ["student-0"]  # the teacher still answers
    assert group.students[0] is not old and made == [("student", 0)]
    assert ray.get(group.students[0].loaded.remote()) == ("weights-v3", 3)  # current weights, version
    assert sup.health()["student-0"]["restarts"] == 1 and sup.restart_counts() == {"student-0": 1}

    kill(group.teachers[0])
    assert states(sup, "dead")["teacher-0"] == "dead"  # seen dead by its ping, before any request
    sup.recover(["teacher-0"], err)
    assert ray.get(group.teachers[0].loaded.remote()) is None  # teachers keep their own weights
    assert sup.health()["teacher-0"]["state"] == "alive"

    kill(group.students[0])
    sup.recover(["student-0"], err)  # the second restart within the window: still allowed
    kill(group.students[0])
    with pytest.raises(ActorLostError, match=r"student-0 died 3 times within 3600 s \(rollout.max_restarts=2\)"
                                             r".*resume with X"):
        sup.recover(["student-0"], err)


def test_a_failed_request_whose_actors_all_answer_blames_the_buffer(ray_cluster):
    group = Group([Echo.remote()], [Echo.remote()])
    sup = Supervisor(group, lambda r, i: Echo.remote(), weights=lambda: (None, 0), timeout_s=30)
    with pytest.raises(ActorLostError, match="replay buffer is the likely loss"):
        sup.recover(["student-0", "teacher-0"], RuntimeError("append failed"))


def test_the_restart_window_forgets_old_restarts(ray_cluster):
    group = Group([Echo.remote()], [])
    sup = Supervisor(group, lambda r, i: Echo.remote(), weights=lambda: (None, 0), max_restarts=1,
                     window_s=2, timeout_s=30)
    kill(group.students[0])
    sup.recover(["student-0"], RuntimeError("x"))
    time.sleep(2.5)  # the first restart falls out of the window
    kill(group.students[0])
    sup.recover(["student-0"], RuntimeError("y"))
    assert sup.restart_counts() == {"student-0": 2}


def test_a_restarted_actor_is_not_marked_dead_by_a_ping_its_predecessor_failed(ray_cluster):
    """Issue 21: after the second restart of one actor /status showed it dead with its old pid
    (and /healthz answered 503 for minutes) while the new actor worked: a ping sent to the dead
    predecessor was still pending at the restart and, read later, marked the new actor dead."""
    group = Group([Echo.remote()], [])
    sup = Supervisor(group, lambda r, i: Echo.remote(), weights=lambda: (None, 0), timeout_s=30)
    for _ in range(2):
        old_pid = ray.get(group.students[0].ping.remote())["pid"]
        kill(group.students[0])
        sup.probe()  # a ping to the dead actor goes out before anyone notices it is gone
        sup.recover(["student-0"], RuntimeError("a request failed"))
        new_pid = ray.get(group.students[0].ping.remote())["pid"]
        assert new_pid != old_pid
        deadline = time.time() + 10
        while time.time() < deadline:  # long enough for the predecessor's ping to fail
            sup.probe()
            time.sleep(0.2)
        health = sup.health()["student-0"]
        assert health["state"] == "alive" and health["pid"] == new_pid, health


def test_the_restart_reason_is_the_lost_actors_own_error(ray_cluster):
    """Issue 21: a killed student's restart was logged with the teacher's score_rows task."""
    group = Group([Echo.remote()], [Echo.remote()])
    logs = []
    sup = Supervisor(group, lambda r, i: Echo.remote(), weights=lambda: (None, 0), timeout_s=30,
                     log=logs.append)
    kill(group.students[0])
    sup.recover(["student-0", "teacher-0"], RuntimeError("ray::TeacherActor.score_rows() failed"))
    assert "score_rows" not in sup.health()["student-0"]["last_error"]
    assert not any("score_rows" in line for line in logs), logs


@ray.remote(num_cpus=0, concurrency_groups={"health": 1})
class SlowRollout(Answering):
    """A rollout actor whose requests take a while (so they are in flight when it is killed)."""

    def sample(self, items):
        return items

    def score_rows(self, samples):
        time.sleep(3)
        return samples

    def sample_rows(self, items):
        time.sleep(3)
        return items


@ray.remote(num_cpus=0)
class Sink:
    """The buffer's two calls the pump makes: append counts rows, available reports none."""

    def ping(self):
        return {"pid": os.getpid()}

    def append(self, rows):
        return {"tokens": len(rows), "rows": len(rows)}

    def available(self, min_version):
        return {"on_policy": 0, "off_policy": 0}


def test_requests_that_died_with_an_already_replaced_actor_are_only_sent_again(ray_cluster):
    """Found by the chaos test: a teacher killed with two requests on it (a student's rows to
    score, and its own samples). The first failure restarted it; the second then found every
    actor answering and failed the job as 'the replay buffer is the likely loss'."""
    from cluster.rollouts import Demand, ItemStream, RolloutPump

    group = Group([SlowRollout.remote()], [SlowRollout.remote()])
    group.buffer = Sink.remote()
    sup = Supervisor(group, lambda r, i: SlowRollout.remote(), weights=lambda: (None, 0), timeout_s=30)
    pump = RolloutPump(group.students, group.teachers, group.buffer, ItemStream([(i, [i]) for i in range(50)], 0),
                       batch_size=4, supervisor=sup, timeout_s=60)
    pump.top_up(Demand(4, 4, steps_left=10, window=2, min_version=0))
    assert len(pump.inflight) == 2  # the student's request (scored by teacher-0) and teacher-0's own
    kill(group.teachers[0])
    pump.drain()  # both fail; the teacher is restarted once and both are sent again
    assert sup.restart_counts() == {"teacher-0": 1}
    assert pump.rows["student"] == 4 and pump.rows["teacher"] == 4
