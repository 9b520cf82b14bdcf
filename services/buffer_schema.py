"""The replay buffer's Arrow schema (a contract: change it with SCHEMA_VERSION) and row building.

One row is one sampled response. Rollout actors build a RecordBatch per request with
``rows_to_batch`` (offsets plus concatenated values, never a RecordBatch per row), and the
learner reads batches back with ``batch_to_rows``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Optional

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = 1
SOURCES = ("student", "teacher", "dataset")
FINISH_REASONS = ("stop", "length", "abort")

_dict = pa.dictionary(pa.int8(), pa.string())
SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("prompt_id", pa.int64()),
        ("source", _dict),
        ("policy_version", pa.int64()),
        ("prompt_ids", pa.list_(pa.int32())),
        ("response_ids", pa.list_(pa.int32())),
        ("behavior_logprobs", pa.list_(pa.float32())),
        ("teacher_topk_ids", pa.list_(pa.list_(pa.int32()))),
        ("teacher_topk_logprobs", pa.list_(pa.list_(pa.float32()))),
        ("teacher_tail_logmass", pa.list_(pa.float32())),
        ("finish_reason", _dict),
        ("created_at", pa.timestamp("ms", tz="UTC")),
    ],
    metadata={"ammd.schema_version": str(SCHEMA_VERSION)},
)


@dataclass
class Row:
    """One trajectory as Python/numpy values; the in-memory twin of a buffer row.

    teacher_topk_ids / teacher_topk_logprobs are [len(response_ids), k]; tail is [len(response_ids)].
    behavior_logprobs holds the sampling policy's log-prob of each response token.
    """

    sample_id: str
    prompt_id: int
    source: str
    policy_version: int
    prompt_ids: np.ndarray
    response_ids: np.ndarray
    behavior_logprobs: np.ndarray
    teacher_topk_ids: np.ndarray
    teacher_topk_logprobs: np.ndarray
    teacher_tail_logmass: np.ndarray
    finish_reason: str = "stop"
    created_at: Optional[datetime] = field(default=None)


def _flat_list(arrays: list[np.ndarray], dtype: pa.DataType) -> pa.Array:
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int32, count=len(arrays))
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate(arrays) if arrays else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=dtype))


def _nested_list(arrays: list[np.ndarray], dtype: pa.DataType) -> pa.Array:
    """list<list<dtype>> from per-row [positions, k] matrices (k may differ between rows)."""
    inner = [row.reshape(-1) for row in arrays]
    per_pos = [np.full(a.shape[0], a.shape[1] if a.ndim == 2 else 0, np.int32) for a in arrays]
    inner_lengths = np.concatenate(per_pos) if per_pos else np.zeros(0, np.int32)
    inner_offsets = np.zeros(len(inner_lengths) + 1, dtype=np.int32)
    np.cumsum(inner_lengths, out=inner_offsets[1:])
    values = np.concatenate(inner) if inner else np.zeros(0)
    inner_arr = pa.ListArray.from_arrays(pa.array(inner_offsets), pa.array(values, type=dtype))
    outer_lengths = np.fromiter((a.shape[0] for a in arrays), dtype=np.int32, count=len(arrays))
    outer_offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum(outer_lengths, out=outer_offsets[1:])
    return pa.ListArray.from_arrays(pa.array(outer_offsets), inner_arr)


def _dict_column(values: list[str], allowed: tuple[str, ...], name: str) -> pa.Array:
    bad = sorted(set(values) - set(allowed))
    if bad:
        raise ValueError(f"buffer column {name!r}: unknown value(s) {bad}; allowed: {list(allowed)}")
    codes = np.array([allowed.index(v) for v in values], dtype=np.int8)
    return pa.DictionaryArray.from_arrays(pa.array(codes), pa.array(list(allowed)))


def validate_row(row: Row) -> None:
    """Refuse a row whose per-position columns disagree in length (names the column)."""
    n = len(row.response_ids)
    checks = {
        "behavior_logprobs": len(row.behavior_logprobs),
        "teacher_topk_ids": row.teacher_topk_ids.shape[0],
        "teacher_topk_logprobs": row.teacher_topk_logprobs.shape[0],
        "teacher_tail_logmass": len(row.teacher_tail_logmass),
    }
    for name, got in checks.items():
        if got != n:
            raise ValueError(f"row {row.sample_id}: column {name} has {got} positions, "
                             f"response_ids has {n}")
    if row.teacher_topk_ids.shape != row.teacher_topk_logprobs.shape:
        raise ValueError(f"row {row.sample_id}: teacher_topk_ids and teacher_topk_logprobs differ "
                         f"in shape {row.teacher_topk_ids.shape} vs {row.teacher_topk_logprobs.shape}")


def rows_to_batch(rows: list[Row]) -> pa.RecordBatch:
    """Build one RecordBatch from many rows, column by column."""
    for row in rows:
        validate_row(row)
    now = datetime.now(timezone.utc)
    columns = [
        pa.array([r.sample_id for r in rows], pa.string()),
        pa.array([r.prompt_id for r in rows], pa.int64()),
        _dict_column([r.source for r in rows], SOURCES, "source"),
        pa.array([r.policy_version for r in rows], pa.int64()),
        _flat_list([np.asarray(r.prompt_ids, np.int32) for r in rows], pa.int32()),
        _flat_list([np.asarray(r.response_ids, np.int32) for r in rows], pa.int32()),
        _flat_list([np.asarray(r.behavior_logprobs, np.float32) for r in rows], pa.float32()),
        _nested_list([np.asarray(r.teacher_topk_ids, np.int32) for r in rows], pa.int32()),
        _nested_list([np.asarray(r.teacher_topk_logprobs, np.float32) for r in rows], pa.float32()),
        _flat_list([np.asarray(r.teacher_tail_logmass, np.float32) for r in rows], pa.float32()),
        _dict_column([r.finish_reason for r in rows], FINISH_REASONS, "finish_reason"),
        pa.array([r.created_at or now for r in rows], pa.timestamp("ms", tz="UTC")),
    ]
    return pa.RecordBatch.from_arrays(columns, schema=SCHEMA)


def _nested_to_numpy(col: pa.Array, i: int, dtype: type) -> np.ndarray:
    positions = col[i].values  # ListArray over positions
    if len(positions) == 0:
        return np.zeros((0, 0), dtype)
    flat = positions.flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    return flat.reshape(len(positions), -1)


def batch_to_rows(table: pa.Table | pa.RecordBatch) -> list[Row]:
    """Read rows back as numpy (for the learner and for tests)."""
    if isinstance(table, pa.Table):
        table = table.combine_chunks().to_batches()[0] if table.num_rows else None
        if table is None:
            return []
    c = {name: table.column(name) for name in SCHEMA.names}
    out = []
    for i in range(table.num_rows):
        out.append(Row(
            sample_id=c["sample_id"][i].as_py(),
            prompt_id=c["prompt_id"][i].as_py(),
            source=c["source"][i].as_py(),
            policy_version=c["policy_version"][i].as_py(),
            prompt_ids=np.asarray(c["prompt_ids"][i].values.to_numpy(zero_copy_only=False)),
            response_ids=np.asarray(c["response_ids"][i].values.to_numpy(zero_copy_only=False)),
            behavior_logprobs=np.asarray(c["behavior_logprobs"][i].values.to_numpy(zero_copy_only=False)),
            teacher_topk_ids=_nested_to_numpy(c["teacher_topk_ids"], i, np.int32),
            teacher_topk_logprobs=_nested_to_numpy(c["teacher_topk_logprobs"], i, np.float32),
            teacher_tail_logmass=np.asarray(c["teacher_tail_logmass"][i].values.to_numpy(zero_copy_only=False)),
            finish_reason=c["finish_reason"][i].as_py(),
            created_at=c["created_at"][i].as_py(),
        ))
    return out
