"""A columnar replay buffer of trajectory rows, held as Arrow record batches.

Contract:
- ``append(batch)`` takes a RecordBatch of ``SCHEMA`` rows; once it returns, the rows are
  acknowledged: with a ``spill_dir`` each appended batch is first written as a sealed Arrow
  IPC segment and named in ``manifest.json`` (written atomically), so a buffer restarted on
  the same directory holds every acknowledged row that was not evicted.
- ``sample(n, on_policy_fraction, min_version)`` returns ``round(n * fraction)`` student rows
  whose ``policy_version >= min_version`` and the rest from teacher/dataset rows, least-used
  rows first, then the oldest weight version (the rows closest to going stale), ties broken
  by a seeded RNG; or ``None`` when either pool is too small: the caller waits for more
  rollouts instead of training on stale data.
- A row is served at most ``on_policy_uses`` (student rows) or ``off_policy_uses`` (teacher
  and dataset rows) times; after that it is spent. Both default to one use, as in TRL: every
  row a learner trains on is a distinct sample. ``available`` counts the servings left, and
  ``stats`` how many rows of each source were appended and served, so the driver can
  generate only what the learner will consume.
- Capacity is in rows; the oldest rows are evicted first (FIFO).

The class is plain Python so it is tested without Ray; the driver runs it as a Ray actor.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.ipc as ipc

from services.buffer_schema import SCHEMA, SCHEMA_VERSION, SOURCES

_STUDENT = SOURCES.index("student")


class ReplayBuffer:
    def __init__(self, capacity_rows: int, seed: int = 0, spill_dir: Optional[str] = None,
                 on_policy_uses: int = 1, off_policy_uses: int = 1):
        if capacity_rows <= 0:
            raise ValueError("buffer.capacity_rows must be positive")
        if on_policy_uses < 1 or off_policy_uses < 1:
            raise ValueError("buffer.on_policy_uses and buffer.off_policy_uses must be >= 1")
        self.capacity = capacity_rows
        self.max_uses = (on_policy_uses, off_policy_uses)
        self.rng = np.random.default_rng(seed)
        self.table = SCHEMA.empty_table()
        self.source = np.zeros(0, np.int8)
        self.version = np.zeros(0, np.int64)
        self.uses = np.zeros(0, np.int64)
        self.appended = 0
        self.evicted = 0
        self.sampled_rows = 0
        self.appended_by_source = np.zeros(len(SOURCES), np.int64)
        self.served_by_source = np.zeros(len(SOURCES), np.int64)   # row-uses handed out
        self.distinct_by_source = np.zeros(len(SOURCES), np.int64)  # rows handed out at least once
        self.spill_dir = Path(spill_dir) if spill_dir else None
        self._segments: list[dict] = []  # [{"file": name, "rows": n}] oldest first
        if self.spill_dir:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            self._recover()

    # -- writing --------------------------------------------------------------------------
    def append(self, batch: pa.RecordBatch | pa.Table) -> dict[str, int]:
        """Append rows; returns rows and response tokens appended, and rows now held."""
        table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
        if not table.schema.equals(SCHEMA, check_metadata=False):
            raise ValueError(f"rows do not match the buffer schema v{SCHEMA_VERSION}: "
                             f"got {table.schema}, want {SCHEMA}")
        if table.num_rows == 0:
            return {"rows": 0, "tokens": 0, "held": self.table.num_rows}
        if self.spill_dir:
            self._seal(table)
        self._add(table)
        self._evict()
        if self.spill_dir:  # the manifest names the new segment only once it is complete
            self._drop_sealed_segments()
        tokens = int(pa.compute.sum(pa.compute.list_value_length(table.column("response_ids"))).as_py() or 0)
        return {"rows": table.num_rows, "tokens": tokens, "held": self.table.num_rows}

    def _add(self, table: pa.Table) -> None:
        source = table.column("source").combine_chunks().indices.to_numpy(zero_copy_only=False)
        # Dictionary order is fixed by SCHEMA (SOURCES), so the codes are the source index.
        self.table = pa.concat_tables([self.table, table.cast(SCHEMA)])
        self.source = np.concatenate([self.source, source.astype(np.int8)])
        self.version = np.concatenate([self.version, table.column("policy_version").to_numpy()])
        self.uses = np.concatenate([self.uses, np.zeros(table.num_rows, np.int64)])
        self.appended += table.num_rows
        self.appended_by_source += np.bincount(source, minlength=len(SOURCES))

    def _evict(self) -> None:
        extra = self.table.num_rows - self.capacity
        if extra <= 0:
            return
        self.table = self.table.slice(extra)
        self.source, self.version, self.uses = self.source[extra:], self.version[extra:], self.uses[extra:]
        self.evicted += extra

    # -- reading --------------------------------------------------------------------------
    def sample(self, n: int, on_policy_fraction: float, min_version: int) -> Optional[pa.Table]:
        """Sample ``n`` rows by source mix and staleness (see module docstring)."""
        n_on = int(round(n * on_policy_fraction))
        on_pool, off_pool = (np.flatnonzero(m) for m in self._usable(min_version))
        if len(on_pool) < n_on or len(off_pool) < n - n_on:
            return None
        chosen = np.concatenate([self._least_used(on_pool, n_on), self._least_used(off_pool, n - n_on)])
        first = chosen[self.uses[chosen] == 0]
        self.distinct_by_source += np.bincount(self.source[first], minlength=len(SOURCES))
        self.served_by_source += np.bincount(self.source[chosen], minlength=len(SOURCES))
        self.uses[chosen] += 1
        self.sampled_rows += len(chosen)
        return self.table.take(pa.array(chosen))

    def _least_used(self, pool: np.ndarray, k: int) -> np.ndarray:
        if k == 0:
            return pool[:0]
        # np.lexsort sorts by its last key first: uses, then version (oldest first), then random.
        order = np.lexsort((self.rng.random(len(pool)), self.version[pool], self.uses[pool]))
        return pool[order[:k]]

    def available(self, min_version: int) -> dict[str, int]:
        """Servings the sampler could hand out now: for every fresh, unspent row, the uses it
        has left (one per row with the default of one use)."""
        on, off = self._usable(min_version)
        left = np.where(self.source == _STUDENT, self.max_uses[0], self.max_uses[1]) - self.uses
        return {"on_policy": int(left[on].sum()), "off_policy": int(left[off].sum())}

    def _usable(self, min_version: int) -> tuple[np.ndarray, np.ndarray]:
        """Boolean masks of the on- and off-policy rows that are fresh enough and not spent."""
        student = self.source == _STUDENT
        on = student & (self.version >= min_version) & (self.uses < self.max_uses[0])
        off = ~student & (self.uses < self.max_uses[1])
        return on, off

    def all_rows(self) -> pa.Table:
        return self.table

    def stats(self) -> dict:
        by_source = {name: int((self.source == i).sum()) for i, name in enumerate(SOURCES)}
        return {
            "rows": int(self.table.num_rows),
            "rows_by_source": by_source,
            "appended_by_source": dict(zip(SOURCES, self.appended_by_source.tolist())),
            "served_by_source": dict(zip(SOURCES, self.served_by_source.tolist())),
            "distinct_served_by_source": dict(zip(SOURCES, self.distinct_by_source.tolist())),
            "appended": self.appended,
            "evicted": self.evicted,
            "sampled_rows": self.sampled_rows,
            "capacity": self.capacity,
        }

    # -- persistence ----------------------------------------------------------------------
    def _seal(self, table: pa.Table) -> None:
        name = f"segment-{self.appended:012d}.arrow"
        tmp = self.spill_dir / (name + ".tmp")
        with pa.OSFile(str(tmp), "wb") as sink, ipc.new_file(sink, SCHEMA) as writer:
            writer.write_table(table.cast(SCHEMA))
        os.replace(tmp, self.spill_dir / name)
        self._segments.append({"file": name, "rows": table.num_rows})

    def _drop_sealed_segments(self) -> None:
        """Delete whole segments that eviction has passed; a partly evicted one stays."""
        held = self.table.num_rows
        total = sum(s["rows"] for s in self._segments)
        while self._segments and total - self._segments[0]["rows"] >= held:
            seg = self._segments.pop(0)
            total -= seg["rows"]
            (self.spill_dir / seg["file"]).unlink(missing_ok=True)
        self._write_manifest(skip_rows=total - held)

    def _write_manifest(self, skip_rows: int) -> None:
        manifest = {"schema_version": SCHEMA.metadata[b"ammd.schema_version"].decode(),
                    "segments": self._segments, "skip_rows": max(0, skip_rows),
                    "appended": self.appended, "evicted": self.evicted}
        tmp = self.spill_dir / "manifest.json.tmp"
        tmp.write_text(json.dumps(manifest))
        os.replace(tmp, self.spill_dir / "manifest.json")

    def _recover(self) -> None:
        path = self.spill_dir / "manifest.json"
        if not path.exists():
            return
        manifest = json.loads(path.read_text())
        tables = []
        for seg in manifest["segments"]:
            # Memory-mapped and zero-copy: the table keeps the map alive.
            tables.append(ipc.open_file(pa.memory_map(str(self.spill_dir / seg["file"]))).read_all())
        self._segments = list(manifest["segments"])
        if tables:
            self._add(pa.concat_tables(tables).slice(manifest["skip_rows"]))
        self.appended, self.evicted = manifest["appended"], manifest["evicted"]
