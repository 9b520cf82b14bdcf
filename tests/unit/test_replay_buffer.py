"""The replay buffer as a plain object: exact round trip, sampling rules, eviction, recovery."""
import numpy as np
import pyarrow as pa
import pytest

from services.buffer_schema import SCHEMA, Row, batch_to_rows, rows_to_batch
from services.replay_buffer import ReplayBuffer


def make_row(i: int, source: str = "student", version: int = 0, k: int = 3, rng=None) -> Row:
    rng = rng or np.random.default_rng(i)
    n_p, n_r = int(rng.integers(1, 6)), int(rng.integers(1, 7))
    lps = np.sort(np.log(rng.dirichlet(np.ones(k + 2), size=n_r)[:, :k]), axis=1)[:, ::-1]
    return Row(sample_id=f"s{i}", prompt_id=i, source=source,
               policy_version=version if source == "student" else -1,
               prompt_ids=rng.integers(0, 50, n_p).astype(np.int32),
               response_ids=rng.integers(0, 50, n_r).astype(np.int32),
               behavior_logprobs=-rng.random(n_r).astype(np.float32),
               teacher_topk_ids=rng.integers(0, 50, (n_r, k)).astype(np.int32),
               teacher_topk_logprobs=lps.astype(np.float32),
               teacher_tail_logmass=np.log(rng.random(n_r)).astype(np.float32),
               finish_reason="stop" if i % 2 else "length")


def assert_rows_equal(a: Row, b: Row) -> None:
    for field in ("sample_id", "prompt_id", "source", "policy_version", "finish_reason"):
        assert getattr(a, field) == getattr(b, field), field
    for field in ("prompt_ids", "response_ids", "behavior_logprobs", "teacher_topk_ids",
                  "teacher_topk_logprobs", "teacher_tail_logmass"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)


def test_rows_round_trip_exactly():
    rows = [make_row(i, "student" if i % 3 else "teacher", version=i % 4) for i in range(20)]
    buf = ReplayBuffer(100)
    buf.append(rows_to_batch(rows[:7]))
    buf.append(rows_to_batch(rows[7:]))
    back = batch_to_rows(buf.all_rows())
    assert len(back) == len(rows)
    for a, b in zip(rows, back):
        assert_rows_equal(a, b)
    assert buf.all_rows().schema.equals(SCHEMA, check_metadata=False)


def test_sample_respects_source_mix_and_staleness():
    rows = [make_row(i, "student", version=i % 3) for i in range(30)] + \
           [make_row(100 + i, "teacher") for i in range(10)]
    buf = ReplayBuffer(1000, seed=1)
    buf.append(rows_to_batch(rows))
    table = buf.sample(8, on_policy_fraction=0.5, min_version=2)
    got = batch_to_rows(table)
    students = [r for r in got if r.source == "student"]
    assert len(students) == 4 and all(r.policy_version >= 2 for r in students)
    assert sum(r.source == "teacher" for r in got) == 4
    # Only 10 rows have version 2: a request for more fresh rows than exist waits (None).
    assert buf.sample(30, on_policy_fraction=1.0, min_version=2) is None


def test_sample_uses_every_row_before_reusing_any():
    buf = ReplayBuffer(1000, seed=0)
    buf.append(rows_to_batch([make_row(i, "teacher") for i in range(12)]))
    seen = [r.sample_id for _ in range(3) for r in batch_to_rows(buf.sample(4, 0.0, 0))]
    assert sorted(seen) == sorted(f"s{i}" for i in range(12))


def test_rows_are_spent_after_their_allowed_uses():
    buf = ReplayBuffer(1000, seed=0, on_policy_uses=1, off_policy_uses=2)
    buf.append(rows_to_batch([make_row(i, "student") for i in range(4)] +
                             [make_row(10 + i, "teacher") for i in range(2)]))
    first = batch_to_rows(buf.sample(4, 0.5, 0))
    second = batch_to_rows(buf.sample(4, 0.5, 0))
    on_ids = [r.sample_id for r in first + second if r.source == "student"]
    assert sorted(on_ids) == [f"s{i}" for i in range(4)]  # each student row served once
    assert buf.available(0) == {"on_policy": 0, "off_policy": 0}
    assert buf.sample(2, 0.5, 0) is None  # spent: the learner waits for new rollouts
    stats = buf.stats()
    assert stats["appended_by_source"] == {"student": 4, "teacher": 2, "dataset": 0}
    assert stats["served_by_source"] == {"student": 4, "teacher": 4, "dataset": 0}
    assert stats["distinct_served_by_source"] == {"student": 4, "teacher": 2, "dataset": 0}


def test_available_counts_the_servings_left():
    buf = ReplayBuffer(1000, seed=0, on_policy_uses=2, off_policy_uses=3)
    buf.append(rows_to_batch([make_row(i, "student", version=1) for i in range(4)] +
                             [make_row(10 + i, "teacher") for i in range(2)]))
    assert buf.available(0) == {"on_policy": 8, "off_policy": 6}
    buf.sample(4, 0.5, 0)
    assert buf.available(0) == {"on_policy": 6, "off_policy": 4}
    assert buf.available(2) == {"on_policy": 0, "off_policy": 4}  # version 1 is stale at 2


def test_oldest_fresh_rows_are_served_first():
    # Rows nearest to going stale go first, so a version's rows are used before they expire.
    buf = ReplayBuffer(1000, seed=3)
    buf.append(rows_to_batch([make_row(i, "student", version=2) for i in range(6)]))
    buf.append(rows_to_batch([make_row(10 + i, "student", version=1) for i in range(6)]))
    first = batch_to_rows(buf.sample(6, 1.0, 1))
    assert {r.policy_version for r in first} == {1}
    assert {r.policy_version for r in batch_to_rows(buf.sample(6, 1.0, 1))} == {2}


def test_fifo_eviction_keeps_the_newest_rows():
    buf = ReplayBuffer(10)
    for start in range(0, 25, 5):
        buf.append(rows_to_batch([make_row(i, "teacher") for i in range(start, start + 5)]))
    ids = [r.sample_id for r in batch_to_rows(buf.all_rows())]
    assert ids == [f"s{i}" for i in range(15, 25)]
    assert buf.stats()["evicted"] == 15


def test_spilled_buffer_recovers_acknowledged_rows(tmp_path):
    rows = [make_row(i, "student", version=1) for i in range(13)]
    buf = ReplayBuffer(8, spill_dir=str(tmp_path))
    for start in range(0, 13, 4):
        buf.append(rows_to_batch(rows[start: start + 4]))
    before = batch_to_rows(buf.all_rows())
    again = ReplayBuffer(8, spill_dir=str(tmp_path))
    after = batch_to_rows(again.all_rows())
    assert [r.sample_id for r in after] == [r.sample_id for r in before] == [f"s{i}" for i in range(5, 13)]
    for a, b in zip(before, after):
        assert_rows_equal(a, b)
    # Segments fully passed by eviction are deleted from disk.
    assert len(list(tmp_path.glob("segment-*.arrow"))) < 4


def test_bad_rows_are_refused_with_the_column_name():
    row = make_row(0)
    row.behavior_logprobs = row.behavior_logprobs[:-1]
    with pytest.raises(ValueError, match="behavior_logprobs"):
        rows_to_batch([row])
    bad = make_row(1)
    bad.source = "oracle"
    with pytest.raises(ValueError, match="source"):
        rows_to_batch([bad])
    with pytest.raises(ValueError, match="schema"):
        ReplayBuffer(5).append(pa.table({"x": [1]}))


@pytest.mark.parametrize("capacity", [100, 10, 7])
def test_recovery_after_each_append_holds_exactly_the_held_rows(tmp_path, capacity):
    buf = ReplayBuffer(capacity, spill_dir=str(tmp_path))
    for start in range(0, 24, 4):
        buf.append(rows_to_batch([make_row(i, "teacher") for i in range(start, start + 4)]))
        again = ReplayBuffer(capacity, spill_dir=str(tmp_path))
        assert ([r.sample_id for r in batch_to_rows(again.all_rows())] ==
                [r.sample_id for r in batch_to_rows(buf.all_rows())])
