"""A columnar replay buffer of trajectory rows, held as Arrow record batches.

Contract:
- ``append(batch)`` takes a RecordBatch of ``SCHEMA`` rows; once it returns, the rows are
  acknowledged: with a ``spill_dir`` each appended batch is first written (and fsynced) as a
  sealed Arrow IPC segment and named in ``manifest.json`` (written atomically), so a buffer
  restarted on the same directory holds every acknowledged row that was not evicted.
- ``sample(n, on_policy_fraction, min_version)`` returns ``round(n * fraction)`` student rows
  whose ``policy_version >= min_version`` and the rest from teacher/dataset rows, least-used
  rows first, then the oldest weight version (the rows closest to going stale), ties in
  arrival order (FIFO); or ``None`` when either pool is too small: the caller waits for more
  rollouts instead of training on stale data.
- A row is served at most ``on_policy_uses`` (student rows) or ``off_policy_uses`` (teacher
  and dataset rows) times; after that it is spent. Both default to one use, as in TRL: every
  row a learner trains on is a distinct sample. ``available`` counts the servings left, and
  ``stats`` how many rows of each source were appended and served, so the driver can
  generate only what the learner will consume.
- Capacity is in rows; the oldest rows are evicted first (FIFO).
- ``snapshot(dest_dir)`` writes a point-in-time copy in the spill format; a buffer built on
  that directory continues exactly where this one stood (rows, use counts, RNG, counters).

On disk (``spill_dir``, and every snapshot directory):
- ``segment-<first row>.arrow``: one sealed Arrow IPC file per appended batch, never modified.
- ``manifest.json``: the commit point of ``append``: run name, the held segments oldest first
  (file, rows, first_row, bytes, sha256), ``skip_rows`` (rows of the first segment already
  evicted), and the counters an append changes (appended, evicted, lost_rows, by source).
- ``state.npz``: the commit point of ``sample``: use counts by global row index (``uses``,
  from ``first_row`` in ``meta``), the sampler RNG state and the served counters.
Each file only changes in the call that owns it, so a crash between any two writes leaves
both files consistent on their own; rows are matched to use counts by their global index.

The class is plain Python so it is tested without Ray; the driver runs it as a Ray actor.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from services.buffer_schema import SCHEMA, SCHEMA_VERSION, SOURCES
from services.liveness import ping_answer

_STUDENT = SOURCES.index("student")
from services.buffer_files import (MANIFEST, STATE, copy_sealed, digest_entry, fsync_dir, read_segment,
                                   require_new_or_empty, with_first_rows, write_durably, write_segment)


class ReplayBuffer:
    def __init__(self, capacity_rows: int, seed: int = 0, spill_dir: Optional[str] = None,
                 on_policy_uses: int = 1, off_policy_uses: int = 1, *,
                 run_name: Optional[str] = None):
        """A buffer of ``capacity_rows`` rows. With ``spill_dir`` every append is sealed there,
        and a directory that already holds a manifest is recovered (verified segment by
        segment; problems land in ``recovery_problems``). A manifest stamped with another
        ``run_name`` is refused (ValueError); ``None`` on either side accepts it. A recovered
        sampler RNG replaces the one seeded from ``seed``."""
        if capacity_rows <= 0:
            raise ValueError("buffer.capacity_rows must be positive")
        if on_policy_uses < 1 or off_policy_uses < 1:
            raise ValueError("buffer.on_policy_uses and buffer.off_policy_uses must be >= 1")
        self.capacity = capacity_rows
        self.max_uses = (on_policy_uses, off_policy_uses)
        self.run_name = run_name
        self.rng = np.random.default_rng(seed)
        self.table = SCHEMA.empty_table()
        self.source = np.zeros(0, np.int8)
        self.version = np.zeros(0, np.int64)
        self.uses = np.zeros(0, np.int64)
        self.row_id = np.zeros(0, np.int64)  # global append index of each held row
        self.appended = 0
        self.evicted = 0
        self.lost_rows = 0  # rows dropped at recovery because their segment was bad
        self.sampled_rows = 0
        self.appended_by_source = np.zeros(len(SOURCES), np.int64)
        self.served_by_source = np.zeros(len(SOURCES), np.int64)   # row-uses handed out
        self.distinct_by_source = np.zeros(len(SOURCES), np.int64)  # rows handed out at least once
        self.recovery_problems: list[str] = []
        self.spill_dir = Path(spill_dir) if spill_dir else None
        # Invariant: self.table == concat(self._segments)[skip_rows:], skip_rows < first's rows.
        self._segments: list[dict] = []  # manifest entries, oldest first
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
        first = self.appended
        if self.spill_dir:
            self._segments.append(write_segment(self.spill_dir, table, first))
        self._add(table, np.arange(first, first + table.num_rows, dtype=np.int64))
        self.appended += table.num_rows
        self.appended_by_source += np.bincount(self.source[-table.num_rows:], minlength=len(SOURCES))
        self._evict()
        if self.spill_dir:  # the manifest names the new segment only once it is complete
            self._drop_sealed_segments()
        tokens = int(pa.compute.sum(pa.compute.list_value_length(table.column("response_ids"))).as_py() or 0)
        return {"rows": table.num_rows, "tokens": tokens, "held": self.table.num_rows}

    def _add(self, table: pa.Table, row_id: np.ndarray) -> None:
        """Hold ``table``'s rows (unused) under the global indices ``row_id``."""
        source = table.column("source").combine_chunks().indices.to_numpy(zero_copy_only=False)
        # Dictionary order is fixed by SCHEMA (SOURCES), so the codes are the source index.
        self.table = pa.concat_tables([self.table, table.cast(SCHEMA)])
        self.source = np.concatenate([self.source, source.astype(np.int8)])
        self.version = np.concatenate([self.version, table.column("policy_version").to_numpy()])
        self.uses = np.concatenate([self.uses, np.zeros(table.num_rows, np.int64)])
        self.row_id = np.concatenate([self.row_id, row_id])

    def _evict(self) -> None:
        extra = self.table.num_rows - self.capacity
        if extra <= 0:
            return
        self.table = self.table.slice(extra)
        self.source, self.version = self.source[extra:], self.version[extra:]
        self.uses, self.row_id = self.uses[extra:], self.row_id[extra:]
        self.evicted += extra

    # -- reading --------------------------------------------------------------------------
    def sample(self, n: int, on_policy_fraction: float, min_version: int) -> Optional[pa.Table]:
        """Sample ``n`` rows by source mix and staleness (see module docstring). With a
        ``spill_dir`` the new use counts and RNG state are on disk once this returns."""
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
        if self.spill_dir:
            write_durably(self.spill_dir / STATE, self._state_bytes())
        return self.table.take(pa.array(chosen))

    def _least_used(self, pool: np.ndarray, k: int) -> np.ndarray:
        if k == 0:
            return pool[:0]
        # np.lexsort sorts by its last key first: uses, then version (oldest first); it is
        # stable, so ties go in arrival order (FIFO, like a data loader reading a shuffled
        # file). What a step trains on then depends on the order rows arrived in, not on how
        # many had landed when it sampled: a resumed job samples what the original one did.
        order = np.lexsort((self.version[pool], self.uses[pool]))
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

    def ping(self) -> dict:
        """Who and where this buffer is (services.liveness), as every actor answers."""
        return ping_answer()

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
            "lost_rows": self.lost_rows,
            "sampled_rows": self.sampled_rows,
            "capacity": self.capacity,
            "recovery_problems": list(self.recovery_problems),
        }

    # -- snapshots ------------------------------------------------------------------------
    def snapshot(self, dest_dir: str) -> dict[str, int]:
        """Write this buffer as it stands into ``dest_dir`` (absent or empty) in the spill
        format: ``ReplayBuffer(..., spill_dir=dest_dir)`` then holds the same rows, use counts,
        RNG state and counters. Sealed segments are copied (reflinked where the filesystem can);
        without a ``spill_dir`` the held rows become one segment. The copy is built beside
        ``dest_dir`` and renamed into place, so a crash never leaves half a snapshot there.
        Returns ``{"rows": rows held, "segments": segment files written}``."""
        dest = Path(dest_dir)
        require_new_or_empty(dest, "snapshot directory")
        if self._is_spill_dir(dest):
            raise ValueError(f"snapshot directory {dest} is the buffer's own spill_dir")
        tmp = dest.with_name(f".{dest.name}.snapshot-tmp")
        shutil.rmtree(tmp, ignore_errors=True)  # left by a snapshot that crashed
        tmp.mkdir(parents=True)
        segments, skip = self._snapshot_segments(tmp)
        write_durably(tmp / STATE, self._state_bytes())
        write_durably(tmp / MANIFEST, self._manifest_bytes(segments, skip))
        os.replace(tmp, dest)  # replaces an empty directory too
        fsync_dir(dest.parent)
        return {"rows": int(self.table.num_rows), "segments": len(segments)}

    def _snapshot_segments(self, directory: Path) -> tuple[list[dict], int]:
        """Put the held rows' segments in ``directory``; returns their entries and skip_rows."""
        if self.spill_dir:
            for seg in self._segments:
                copy_sealed(self.spill_dir / seg["file"], directory / seg["file"])
            return [dict(s) for s in self._segments], self._skip_rows()
        if self.table.num_rows == 0:
            return [], 0
        # Without a spill_dir rows only arrive by append, so their indices are contiguous.
        return [write_segment(directory, self.table, int(self.row_id[0]))], 0

    def _is_spill_dir(self, path: Path) -> bool:
        return self.spill_dir is not None and path.resolve() == self.spill_dir.resolve()

    # -- persistence ----------------------------------------------------------------------
    def _skip_rows(self) -> int:
        return sum(s["rows"] for s in self._segments) - self.table.num_rows

    def _drop_sealed_segments(self) -> None:
        """Delete whole segments that eviction has passed (a partly evicted one stays), then
        commit the manifest."""
        while self._segments and self._skip_rows() >= self._segments[0]["rows"]:
            (self.spill_dir / self._segments.pop(0)["file"]).unlink(missing_ok=True)
        write_durably(self.spill_dir / MANIFEST, self._manifest_bytes(self._segments, self._skip_rows()))

    def _manifest_bytes(self, segments: list[dict], skip_rows: int) -> bytes:
        manifest = {"schema_version": SCHEMA.metadata[b"ammd.schema_version"].decode(),
                    "run_name": self.run_name, "segments": segments, "skip_rows": max(0, skip_rows),
                    "appended": self.appended, "evicted": self.evicted, "lost_rows": self.lost_rows,
                    "appended_by_source": self.appended_by_source.tolist()}
        return json.dumps(manifest, indent=1).encode()

    def _state_bytes(self) -> bytes:
        """Use counts by global row index from the first held row (zeros in gaps left by
        skipped segments), RNG state and served counters, as one npz."""
        first = int(self.row_id[0]) if len(self.row_id) else self.appended
        top = int(self.uses.max()) if len(self.uses) else 0
        uses = np.zeros(self.appended - first, np.min_scalar_type(top))
        uses[self.row_id - first] = self.uses
        meta = {"first_row": first, "rng": self.rng.bit_generator.state,
                "served_by_source": self.served_by_source.tolist(),
                "distinct_by_source": self.distinct_by_source.tolist(),
                "sampled_rows": self.sampled_rows}
        out = io.BytesIO()
        np.savez(out, uses=uses, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))
        return out.getvalue()

    # -- recovery -------------------------------------------------------------------------
    def _recover(self) -> None:
        path = self.spill_dir / MANIFEST
        if not path.exists():
            return
        try:
            manifest = json.loads(path.read_text())
            assert isinstance(manifest, dict) and isinstance(manifest["segments"], list)
        except (OSError, ValueError, KeyError, AssertionError):
            raise ValueError(f"replay buffer manifest {path} is damaged (not the JSON the buffer "
                             f"wrote); resume from another checkpoint, or start over") from None
        self._check_run(manifest.get("run_name"))
        rewrite = self._load_segments(manifest)
        self.appended, self.evicted = manifest["appended"], manifest["evicted"]
        self.lost_rows += manifest.get("lost_rows", 0)
        if "appended_by_source" in manifest:
            self.appended_by_source = np.array(manifest["appended_by_source"], np.int64)
        else:  # an older manifest: only the rows held are known
            self.appended_by_source = np.bincount(self.source, minlength=len(SOURCES)).astype(np.int64)
        self._load_state()
        if rewrite:  # drop bad segments from the manifest, record checksums it lacked
            write_durably(path, self._manifest_bytes(self._segments, self._skip_rows()))

    def _check_run(self, stored: Optional[str]) -> None:
        if stored and self.run_name and stored != self.run_name:
            raise ValueError(
                f"replay buffer spill_dir {self.spill_dir} holds rows of run {stored!r}, not of "
                f"this run {self.run_name!r}: remove {self.spill_dir} or point buffer.spill_dir "
                f"elsewhere")
        self.run_name = self.run_name or stored  # keep the stamp when the caller gave none

    def _load_segments(self, manifest: dict) -> bool:
        """Hold every segment that verifies; report and skip the others. Returns whether the
        manifest needs rewriting (a segment was skipped or lacked its checksum)."""
        skip, rewrite, tables, ids = manifest["skip_rows"], False, [], []
        for j, seg in enumerate(with_first_rows(manifest)):
            lead = skip if j == 0 else 0  # skip_rows belongs to the first listed segment only
            table, problem = read_segment(self.spill_dir, seg)
            if problem:
                self._report(f"{problem}; skipped its {seg['rows'] - lead} rows")
                self.lost_rows += seg["rows"] - lead
                rewrite = True
                continue
            if "sha256" not in seg:  # an older manifest: record it so later recoveries verify
                seg.update(digest_entry(self.spill_dir / seg["file"]))
                rewrite = True
            # A kept first segment keeps its skip; if it was skipped, its successor is whole,
            # so concat(self._segments)[skip_rows:] == self.table holds either way.
            tables.append(table.slice(lead))
            ids.append(np.arange(seg["first_row"] + lead, seg["first_row"] + seg["rows"], dtype=np.int64))
            self._segments.append(seg)
        if tables:
            self._add(pa.concat_tables(tables), np.concatenate(ids))
        return rewrite

    def _load_state(self) -> None:
        """Restore use counts (matched by global row index), RNG and served counters."""
        path = self.spill_dir / STATE
        if not path.exists():
            return
        try:
            with np.load(path, allow_pickle=False) as npz:
                uses, meta = npz["uses"].astype(np.int64), json.loads(npz["meta"].tobytes())
            rng = np.random.default_rng()
            rng.bit_generator.state = meta["rng"]
            served = np.array(meta["served_by_source"], np.int64)
            distinct = np.array(meta["distinct_by_source"], np.int64)
            sampled, first = int(meta["sampled_rows"]), int(meta["first_row"])
        except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as err:
            self._report(f"{path}: unreadable ({err}); use counts, sampler RNG and served "
                         f"counters start afresh")
            return
        index = self.row_id - first
        known = (index >= 0) & (index < len(uses))  # rows appended after the last sample are unused
        self.uses[known] = uses[index[known]]
        self.rng, self.served_by_source, self.distinct_by_source = rng, served, distinct
        self.sampled_rows = sampled

    def _report(self, problem: str) -> None:
        self.recovery_problems.append(problem)
        print(f"[ammd buffer] recovery: {problem}", flush=True)
