"""The replay buffer as the job runs it: a Ray actor fed by batched appends from other tasks."""
import pytest

from services.buffer_schema import batch_to_rows, rows_to_batch
from services.replay_buffer import ReplayBuffer
from tests.unit.test_replay_buffer import assert_rows_equal, make_row

pytestmark = pytest.mark.slow


def test_buffer_actor_returns_exactly_the_rows_it_was_given(ray_cluster, tmp_path):
    buf = ray_cluster.remote(ReplayBuffer).options(num_cpus=0).remote(1000, 0, str(tmp_path))
    rows = [make_row(i, "student" if i % 2 else "teacher", version=i % 3, k=1 + i % 4) for i in range(40)]

    @ray_cluster.remote
    def produce(chunk):  # a separate worker process builds and sends the batch, like a rollout
        return rows_to_batch(chunk)

    acks = ray_cluster.get([buf.append.remote(produce.remote(rows[i:i + 10])) for i in range(0, 40, 10)])
    assert sum(a["rows"] for a in acks) == 40
    back = {r.sample_id: r for r in batch_to_rows(ray_cluster.get(buf.all_rows.remote()))}
    assert len(back) == 40
    for row in rows:
        assert_rows_equal(row, back[row.sample_id])
    sampled = batch_to_rows(ray_cluster.get(buf.sample.remote(10, 0.5, 0)))
    for row in sampled:
        assert_rows_equal(next(r for r in rows if r.sample_id == row.sample_id), row)
    stats = ray_cluster.get(buf.stats.remote())
    assert stats["rows_by_source"] == {"student": 20, "teacher": 20, "dataset": 0}
    ray_cluster.kill(buf)
    # The spilled segments hold every acknowledged row after the actor is gone.
    again = ReplayBuffer(1000, spill_dir=str(tmp_path))
    assert sorted(r.sample_id for r in batch_to_rows(again.all_rows())) == sorted(back)
