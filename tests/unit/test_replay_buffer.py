"""The replay buffer as a plain object: exact round trip, sampling rules, eviction, recovery,
verified spill segments, restart of use counts and RNG, snapshots."""
import copy
import json

import numpy as np
import pyarrow as pa
import pytest

from services.buffer_schema import SCHEMA, Row, batch_to_rows, rows_to_batch
from services.buffer_files import copy_snapshot
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


# -- trustworthy spill: checksums, run names, use counts and RNG, snapshots ------------------
def ids(table: pa.Table) -> list[str]:
    return table.column("sample_id").to_pylist()


def fill(buf: ReplayBuffer, starts: range, size: int = 4, source: str = "teacher") -> None:
    for start in starts:
        buf.append(rows_to_batch([make_row(i, source) for i in range(start, start + size)]))


def test_recovery_skips_corrupt_and_truncated_segments_by_name(tmp_path):
    buf = ReplayBuffer(100, spill_dir=str(tmp_path), run_name="r1")
    fill(buf, range(0, 16, 4))
    segs = sorted(tmp_path.glob("segment-*.arrow"))
    assert len(segs) == 4
    data = bytearray(segs[1].read_bytes())
    mid = len(data) // 2
    data[mid: mid + 8] = bytes(b ^ 0xFF for b in data[mid: mid + 8])  # same size, other bytes
    segs[1].write_bytes(bytes(data))
    segs[2].write_bytes(segs[2].read_bytes()[:-100])
    again = ReplayBuffer(100, spill_dir=str(tmp_path), run_name="r1")
    problems = again.stats()["recovery_problems"]
    assert len(problems) == 2 and problems == again.recovery_problems
    assert segs[1].name in problems[0] and "sha256" in problems[0]
    assert segs[2].name in problems[1] and "bytes" in problems[1]
    assert ids(again.all_rows()) == [f"s{i}" for i in [*range(0, 4), *range(12, 16)]]
    assert again.stats()["lost_rows"] == 8
    # The rewritten manifest no longer names the bad files: the next restart is clean, and
    # eviction and appends go on from the recovered rows.
    fill(again, range(16, 20))
    third = ReplayBuffer(100, spill_dir=str(tmp_path), run_name="r1")
    assert third.recovery_problems == [] and third.stats()["lost_rows"] == 8
    assert ids(third.all_rows()) == ids(again.all_rows())


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_a_bad_first_segment_keeps_the_row_math_right(tmp_path, damage):
    # Capacity 10 over four 4-row segments: the first held segment (s4..s7) is half evicted
    # (skip_rows 2); losing it leaves s8..s15, and eviction carries on from there.
    buf = ReplayBuffer(10, spill_dir=str(tmp_path))
    fill(buf, range(0, 16, 4))
    first = sorted(tmp_path.glob("segment-*.arrow"))[0]
    if damage == "missing":
        first.unlink()
    else:
        first.write_bytes(b"\0" * first.stat().st_size)
    again = ReplayBuffer(10, spill_dir=str(tmp_path))
    assert len(again.recovery_problems) == 1 and first.name in again.recovery_problems[0]
    assert ids(again.all_rows()) == [f"s{i}" for i in range(8, 16)]
    assert again.stats()["lost_rows"] == 2
    for start in range(16, 28, 4):
        again.append(rows_to_batch([make_row(i, "teacher") for i in range(start, start + 4)]))
        recovered = ReplayBuffer(10, spill_dir=str(tmp_path))
        assert ids(recovered.all_rows()) == ids(again.all_rows())
        assert recovered.recovery_problems == []
    assert ids(again.all_rows()) == [f"s{i}" for i in range(18, 28)]


def test_a_manifest_of_another_run_is_refused(tmp_path):
    fill(ReplayBuffer(100, spill_dir=str(tmp_path), run_name="gkd-arith-7"), range(0, 4, 4))
    with pytest.raises(ValueError, match="gkd-arith-7") as err:
        ReplayBuffer(100, spill_dir=str(tmp_path), run_name="sft-summarize-2")
    assert "sft-summarize-2" in str(err.value) and str(tmp_path) in str(err.value)
    assert "point buffer.spill_dir elsewhere" in str(err.value)
    # An unnamed buffer accepts the directory and keeps its name on disk.
    unnamed = ReplayBuffer(100, spill_dir=str(tmp_path))
    assert unnamed.run_name == "gkd-arith-7" and unnamed.all_rows().num_rows == 4


def test_an_older_manifest_is_accepted_and_gains_checksums(tmp_path):
    fill(ReplayBuffer(100, spill_dir=str(tmp_path)), range(0, 8, 4))
    path = tmp_path / "manifest.json"
    manifest = json.loads(path.read_text())
    for key in ("run_name", "appended_by_source", "lost_rows"):
        manifest.pop(key)
    manifest["segments"] = [{"file": s["file"], "rows": s["rows"]} for s in manifest["segments"]]
    path.write_text(json.dumps(manifest))
    again = ReplayBuffer(100, spill_dir=str(tmp_path), run_name="new")
    assert again.recovery_problems == [] and ids(again.all_rows()) == [f"s{i}" for i in range(8)]
    assert all("sha256" in s and "bytes" in s for s in json.loads(path.read_text())["segments"])


def test_use_counts_and_sampler_rng_survive_a_restart(tmp_path):
    a = ReplayBuffer(1000, seed=5, spill_dir=str(tmp_path), off_policy_uses=2)
    a.append(rows_to_batch([make_row(i, "student", version=1) for i in range(10)] +
                           [make_row(100 + i, "teacher") for i in range(6)]))
    served = [ids(a.sample(4, 0.5, 0)) for _ in range(2)]
    a.append(rows_to_batch([make_row(200 + i, "student", version=1) for i in range(4)]))  # after the last sample
    b = ReplayBuffer(1000, seed=123, spill_dir=str(tmp_path), off_policy_uses=2)
    np.testing.assert_array_equal(b.uses, a.uses)
    assert b.stats() == a.stats()
    assert b.rng.bit_generator.state == a.rng.bit_generator.state
    spent = {i for batch in served for i in batch if not i.startswith("s1")}  # student rows, one use
    later_a, later_b = [], []
    for buf, out in ((a, later_a), (b, later_b)):
        while (table := buf.sample(4, 0.5, 0)) is not None:
            out.append(ids(table))
    assert later_a == later_b and len(later_b) >= 3
    assert spent and not spent & {i for batch in later_b for i in batch}


@pytest.mark.parametrize("spill", [True, False])
def test_snapshot_recovers_exactly_the_buffer_at_snapshot_time(tmp_path, spill):
    live = ReplayBuffer(12, seed=9, spill_dir=str(tmp_path / "live") if spill else None,
                        off_policy_uses=2, run_name="r")
    fill(live, range(0, 20, 4), source="student")  # evicts: the first held segment is partial
    fill(live, range(100, 108, 4))
    live.sample(4, 0.5, 0)
    live.sample(6, 0.5, 0)
    info = live.snapshot(str(tmp_path / "snap"))
    want_rows, want_uses = ids(live.all_rows()), live.uses.copy()
    want_stats = copy.deepcopy(live.stats())
    want_samples = [ids(t) for t in (live.sample(3, 0.3, 0), live.sample(2, 0.5, 0))]
    fill(live, range(200, 240, 4))  # the live buffer evicts and deletes every snapshotted segment
    live.sample(5, 0.0, 0)
    assert info == {"rows": len(want_rows), "segments": 3 if spill else 1}
    snap = ReplayBuffer(12, seed=0, spill_dir=str(tmp_path / "snap"), off_policy_uses=2, run_name="r")
    assert ids(snap.all_rows()) == want_rows
    np.testing.assert_array_equal(snap.uses, want_uses)
    assert snap.stats() == want_stats
    assert [ids(t) for t in (snap.sample(3, 0.3, 0), snap.sample(2, 0.5, 0))] == want_samples
    with pytest.raises(ValueError, match="new or empty"):
        live.snapshot(str(tmp_path / "snap"))


def test_a_snapshot_shares_no_file_with_the_live_spill(tmp_path):
    """Issue 21: hard-linked segments made one corrupt file corrupt every checkpoint's copy."""
    live = ReplayBuffer(100, spill_dir=str(tmp_path / "live"), run_name="r")
    fill(live, range(0, 8, 4))
    (tmp_path / "snap").mkdir()  # an empty directory is fine
    live.snapshot(str(tmp_path / "snap"))
    segs = sorted((tmp_path / "live").glob("segment-*.arrow"))
    assert len(segs) == 2
    for seg in segs:
        copy = tmp_path / "snap" / seg.name
        assert seg.stat().st_ino != copy.stat().st_ino and copy.stat().st_nlink == 1
        assert copy.read_bytes() == seg.read_bytes()
    segs[0].write_bytes(b"\0" * segs[0].stat().st_size)  # the live file rots
    restored = ReplayBuffer(100, spill_dir=str(tmp_path / "snap"), run_name="r")
    assert restored.stats()["rows"] == 8 and restored.stats()["recovery_problems"] == []


def test_clearing_a_spill_dir_deletes_only_a_buffers_files(tmp_path):
    from services.buffer_files import clear_spill_dir, foreign_files
    live = ReplayBuffer(100, spill_dir=str(tmp_path / "spill"), run_name="r")
    fill(live, range(0, 8, 4))
    assert foreign_files(tmp_path / "spill") == []
    (tmp_path / "spill" / "thesis.tex").write_text("years of work")
    assert foreign_files(tmp_path / "spill") == ["thesis.tex"]
    with pytest.raises(ValueError, match="thesis.tex"):
        clear_spill_dir(tmp_path / "spill")
    assert sorted(p.name for p in (tmp_path / "spill").iterdir()) == [  # nothing deleted
        "manifest.json", "segment-000000000000.arrow", "segment-000000000004.arrow", "thesis.tex"]
    (tmp_path / "spill" / "thesis.tex").unlink()
    clear_spill_dir(tmp_path / "spill")
    assert list((tmp_path / "spill").iterdir()) == []


def test_a_copied_snapshot_goes_on_while_the_snapshot_stays_intact(tmp_path):
    live = ReplayBuffer(8, seed=2, spill_dir=str(tmp_path / "live"), run_name="r")
    fill(live, range(0, 12, 4))
    live.sample(3, 0.0, 0)
    live.snapshot(str(tmp_path / "snap"))
    before = {p.name: p.read_bytes() for p in (tmp_path / "snap").iterdir()}
    copy_snapshot(str(tmp_path / "snap"), str(tmp_path / "resumed"))
    resumed = ReplayBuffer(8, spill_dir=str(tmp_path / "resumed"), run_name="r")
    assert ids(resumed.all_rows()) == ids(live.all_rows())
    fill(resumed, range(100, 120, 4))  # evicts and deletes every segment it started with
    resumed.sample(4, 0.0, 0)
    assert {p.name: p.read_bytes() for p in (tmp_path / "snap").iterdir()} == before
    with pytest.raises(ValueError, match="new or empty"):
        copy_snapshot(str(tmp_path / "snap"), str(tmp_path / "resumed"))
