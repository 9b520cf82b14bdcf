"""The run directory ``<output_dir>/<name>``: made private, and earlier files set aside.

Everything a job writes lives below it (checkpoints, the replay buffer's spill, TensorBoard
files, the report, the student). It is created 0700: a checkpoint is code to whoever can write
it (cluster.checkpoint), and the rows and weights in it are the user's.
"""
from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Optional


def nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def writable_problem(path: Path) -> Optional[str]:
    """Why ``path`` (a directory to create or write into) cannot be written, or None."""
    base = nearest_existing(path)
    if not base.is_dir():
        return f"{base} is not a directory"
    if not os.access(base, os.W_OK | os.X_OK):
        return f"{base} is not writable by this user"
    return None


def make_private_dir(path: Path) -> Path:
    """Create ``path`` (and missing parents) and make it 0700; returns it."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def set_aside(path: Path) -> Optional[Path]:
    """Move a non-empty directory ``path`` to ``<parent>/previous-<time>/<name>`` and return where
    it went (None when there was nothing to move). A new job must not mix its files with an
    earlier run's, nor delete what a forgotten ``--resume`` would have continued. Two moves in
    one second (a job started twice quickly) get distinct directories."""
    if not (path.is_dir() and any(path.iterdir())):
        return None
    dest = path.parent / time.strftime("previous-%Y%m%d-%H%M%S") / path.name
    if dest.exists():
        dest = dest.parent.with_name(f"{dest.parent.name}-{uuid.uuid4().hex[:6]}") / path.name
    make_private_dir(dest.parent)
    os.replace(path, dest)
    return dest
