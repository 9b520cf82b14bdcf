"""Sizing rollouts by demand (cluster.rollouts.Demand) against the real replay buffer.

A small discrete-time simulation stands in for Ray and the engines (what it replaces: the
actors' latency, modelled as a random number of learner steps per request). It drives the
driver's rule for the window (cluster.driver.Trainer.demand) and the pump's sizing, and checks
the property the issue asks for: every row generated is trained on, none goes stale unused,
and the job still finishes.
"""
import numpy as np
import pytest

from cluster.rollouts import Demand
from services.replay_buffer import ReplayBuffer
from tests.unit.test_replay_buffer import make_row
from services.buffer_schema import rows_to_batch


def simulate(steps, sync_every, staleness, n_on, n_off, batch_size, latency, seed, uses_off=1):
    rng = np.random.default_rng(seed)
    buf = ReplayBuffer(100_000, seed=seed, off_policy_uses=uses_off)
    step = version = tick = made = 0
    generated = {"student": 0, "teacher": 0}
    inflight = {}  # source -> (ready tick, rows, version)
    while step < steps:
        tick += 1
        assert tick < 50 * steps, "the simulated job stalled"
        window = (staleness + 1) * sync_every - step % sync_every
        d = Demand(n_on, n_off, steps - step, window, version - staleness, 1, uses_off)
        have = buf.available(d.min_version)
        asked = {"student": d.on_policy_rows(have["on_policy"], inflight.get("student", (0, 0))[1]),
                 "teacher": d.off_policy_rows(have["off_policy"], inflight.get("teacher", (0, 0))[1])}
        for source, n in asked.items():
            n = min(n, batch_size)
            if n > 0 and source not in inflight:
                inflight[source] = (tick + int(rng.integers(*latency)), n, version)
        for source, (ready, n, v) in list(inflight.items()):
            if ready <= tick:
                buf.append(rows_to_batch([make_row(made + i, source, version=v) for i in range(n)]))
                made += n
                generated[source] += n
                del inflight[source]
        if buf.sample(n_on + n_off, n_on / (n_on + n_off), version - staleness) is not None:
            step += 1
            version += step % sync_every == 0
    return generated, buf.stats()


@pytest.mark.parametrize("sync_every,staleness,n_on,n_off,batch,latency", [
    (5, 1, 16, 16, 64, (0, 3)),     # the benchmark's shape
    (10, 1, 8, 8, 64, (0, 6)),      # the demo's
    (4, 0, 16, 0, 32, (0, 2)),      # synchronous, on-policy only
    (3, 2, 7, 9, 20, (1, 8)),       # slow actors, odd sizes
])
def test_every_generated_row_is_trained_on(sync_every, staleness, n_on, n_off, batch, latency):
    steps = 60
    for seed in range(3):
        generated, stats = simulate(steps, sync_every, staleness, n_on, n_off, batch, latency, seed)
        served = stats["served_by_source"]
        assert served["student"] == steps * n_on and served["teacher"] == steps * n_off
        assert generated["student"] == served["student"]  # nothing went stale or was left over
        assert generated["teacher"] == served["teacher"]
        assert stats["distinct_served_by_source"]["teacher"] == steps * n_off  # no reuse by default


def test_off_policy_reuse_only_when_asked():
    generated, stats = simulate(40, 5, 1, 8, 8, 64, (0, 3), seed=0, uses_off=4)
    assert stats["served_by_source"]["teacher"] == 40 * 8
    assert generated["teacher"] == 40 * 8 / 4  # each row served four times, as configured


def test_demand_sizes():
    d = Demand(per_step_on=16, per_step_off=8, steps_left=3, window=10, min_version=0, ahead=8)
    assert d.on_policy_rows(servings=0, inflight_rows=0) == 48   # capped by the steps left
    assert d.on_policy_rows(servings=40, inflight_rows=8) == 0
    assert d.off_policy_rows(servings=4, inflight_rows=0) == 20
    d = Demand(16, 8, steps_left=100, window=2, min_version=0, uses_off=3)
    assert d.on_policy_rows(0, 0) == 32                          # capped by freshness
    assert d.off_policy_rows(servings=0, inflight_rows=0) == 22  # ceil(64 / 3)


def test_prompt_stream_serves_every_item_once_per_epoch():
    from cluster.rollouts import item_stream, next_n
    stream = item_stream(list(range(10)), seed=4)
    epochs = [next_n(stream, 10) for _ in range(3)]
    assert all(sorted(e) == list(range(10)) for e in epochs)
    assert epochs[0] != epochs[1]  # reshuffled every epoch
    assert next_n(item_stream(list(range(10)), seed=4), 10) == epochs[0]  # seeded


def test_prompt_stream_resumes_where_its_state_says():
    from cluster.rollouts import item_stream, next_n
    stream = item_stream(list(range(7)), seed=3)
    next_n(stream, 9)  # into the second epoch
    state = stream.state()
    want = next_n(stream, 12)  # crosses into the third epoch
    again = item_stream(list(range(7)), seed=3)
    again.restore(state)
    assert next_n(again, 12) == want


def test_tokens_per_s_after_a_resume_counts_only_the_new_process_tokens():
    """A resumed pump carries the earlier run's token total (saved in the checkpoint) but times
    only its own: dividing the old total by the new clock would report a rate the job never had."""

    from cluster.rollouts import RolloutPump, item_stream

    first = RolloutPump([], [], None, item_stream([1, 2, 3], seed=0))
    first.tokens = 1_000_000  # a long earlier run
    saved = first.state()
    resumed = RolloutPump([], [], None, item_stream([1, 2, 3], seed=0))
    resumed.restore(saved)
    assert resumed.tokens == 1_000_000  # the total survives the resume
    assert resumed.tokens_per_s() == 0.0  # nothing made since this process started
    resumed.started -= 10.0  # ten seconds later, 500 new tokens
    resumed.tokens += 500
    assert resumed.tokens_per_s() == pytest.approx(50.0, rel=0.01)
