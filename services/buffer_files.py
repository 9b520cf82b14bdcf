"""The replay buffer's spill format on disk: sealed Arrow segments, the manifest, copies.

The format itself is described in ``services.replay_buffer``; this module holds the file-level
pieces: writing a segment and reading it back verified, durable writes, independent copies of
sealed files, and telling a buffer's own files from anything else in a directory (which ammd
never deletes).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Optional

import pyarrow as pa
import pyarrow.ipc as ipc

from services.buffer_schema import SCHEMA, SCHEMA_VERSION

MANIFEST = "manifest.json"
STATE = "state.npz"


def spill_owner(spill_dir: str | Path) -> Optional[str]:
    """The run named in ``spill_dir``'s manifest (None: no manifest, or an unnamed one)."""
    path = Path(spill_dir) / MANIFEST
    try:
        return json.loads(path.read_text()).get("run_name") if path.is_file() else None
    except (OSError, ValueError):
        return None


def copy_snapshot(snapshot_dir: str, spill_dir: str) -> None:
    """Copy snapshot ``snapshot_dir`` into ``spill_dir`` (new or empty), so that
    ``ReplayBuffer(..., spill_dir=spill_dir)`` continues from it while the snapshot stays as
    it was: a buffer built on the snapshot directory itself would append, evict and delete
    there. A copy (or reflink), not a link: the two must not share one file on disk."""
    src, dest = Path(snapshot_dir), Path(spill_dir)
    if not (src / MANIFEST).exists():
        raise ValueError(f"{src} holds no replay buffer snapshot (no {MANIFEST})")
    require_new_or_empty(dest, "buffer.spill_dir")
    dest.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        if path.is_file() and not path.name.endswith(".tmp"):
            copy_sealed(path, dest / path.name)
    fsync_dir(dest)


# -- files ------------------------------------------------------------------------------------
def require_new_or_empty(path: Path, what: str) -> None:
    if path.exists() and any(path.iterdir()):
        raise ValueError(f"{what} {path} must be new or empty")


def write_segment(directory: Path, table: pa.Table, first_row: int) -> dict:
    """Seal ``table`` as an Arrow IPC file; returns its manifest entry."""
    sink = pa.BufferOutputStream()
    with ipc.new_file(sink, SCHEMA) as writer:
        writer.write_table(table.cast(SCHEMA))
    data = sink.getvalue()
    name = f"segment-{first_row:012d}.arrow"
    write_durably(directory / name, data, sync_dir=False)  # the manifest's write syncs the dir
    return {"file": name, "rows": table.num_rows, "first_row": first_row,
            "bytes": data.size, "sha256": hashlib.sha256(data).hexdigest()}


def read_segment(directory: Path, seg: dict) -> tuple[Optional[pa.Table], Optional[str]]:
    """The segment's rows, or None and what is wrong with its file (naming it)."""
    path = directory / seg["file"]
    if not path.exists():
        return None, f"{path}: missing"
    size = path.stat().st_size
    if "bytes" in seg and size != seg["bytes"]:
        return None, f"{path}: {size} bytes on disk, the manifest says {seg['bytes']} (truncated?)"
    try:
        data = pa.memory_map(str(path)).read_buffer()  # zero-copy; the table keeps the map alive
        if "sha256" in seg and hashlib.sha256(data).hexdigest() != seg["sha256"]:
            return None, f"{path}: sha256 differs from the manifest's (corrupt)"
        table = ipc.open_file(pa.BufferReader(data)).read_all()
    except (OSError, pa.ArrowException) as err:
        return None, f"{path}: not a readable Arrow file ({err})"
    if not table.schema.equals(SCHEMA, check_metadata=False):
        return None, f"{path}: schema differs from buffer schema v{SCHEMA_VERSION}"
    if table.num_rows != seg["rows"]:
        return None, f"{path}: {table.num_rows} rows, the manifest says {seg['rows']}"
    return table, None


def digest_entry(path: Path) -> dict:
    data = pa.memory_map(str(path)).read_buffer()
    return {"bytes": data.size, "sha256": hashlib.sha256(data).hexdigest()}


def with_first_rows(manifest: dict) -> list[dict]:
    """Manifest entries with ``first_row``; older manifests lack it, but their segments are
    contiguous and end at ``appended``."""
    segments = [dict(s) for s in manifest["segments"]]
    end = manifest["appended"]
    for seg in reversed(segments):
        seg.setdefault("first_row", end - seg["rows"])
        end = seg["first_row"]
    return segments


def write_durably(path: Path, data, sync_dir: bool = True) -> None:
    """Replace ``path`` by ``data`` atomically (readers see the old or the new file, never a
    mix) and durably (fsynced, so an acknowledged write survives a power loss too)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if sync_dir:
        fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_sealed(src: Path, dst: Path) -> None:
    """An independent copy of a sealed file: a reflink where the filesystem has them (no bytes
    copied, yet a later write or bit flip in one file does not reach the other), else a plain
    copy. Never a hard link: one damaged inode would damage every checkpoint holding it."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        try:
            import fcntl
            fcntl.ioctl(fout.fileno(), 0x40049409, fin.fileno())  # FICLONE (btrfs, XFS, ...)
        except (ImportError, OSError):
            shutil.copyfileobj(fin, fout, 1 << 22)
        fout.flush()
        os.fsync(fout.fileno())


def foreign_files(spill_dir: str | Path) -> list[str]:
    """Entries of ``spill_dir`` that no replay buffer writes: while there are any, the directory
    is not the buffer's to clear (it may be anything of the user's)."""
    path = Path(spill_dir)
    if not path.is_dir():
        return []
    return sorted(p.name for p in path.iterdir() if not _is_buffer_file(p))


def _is_buffer_file(p: Path) -> bool:
    name = p.name.removesuffix(".tmp")
    return p.is_file() and not p.is_symlink() and (
        name in (MANIFEST, STATE) or (name.startswith("segment-") and name.endswith(".arrow")))


def clear_spill_dir(spill_dir: str | Path) -> None:
    """Delete a buffer's own files from ``spill_dir``, keeping the directory; ValueError (nothing
    deleted) if it holds anything else, OSError if a delete fails."""
    path = Path(spill_dir)
    foreign = foreign_files(path)
    if foreign:
        raise ValueError(f"{path} holds files that are not a replay buffer's ({', '.join(foreign[:3])})")
    for p in path.iterdir() if path.is_dir() else ():
        p.unlink()
