"""Moving the learner's weights to the rollout engines: buckets and transports.

Weights travel in buckets: each bucket is one flat byte buffer plus a table of
(name, dtype, shape, offset) entries, so a push is a handful of transfers, never one RPC per
parameter. Bytes are dtype-agnostic, which carries bf16 (numpy has no bf16) unchanged.

A transport moves buckets from learner rank 0 to every rollout actor. It is picked once from
``learner.weight_transport``; the learner side calls ``send`` and the rollout side ``receive``.
- ``object_store``: buckets are numpy arrays in Ray's object store (zero-copy reads on the
  same node). Works everywhere Ray works, so it is the default and the fallback.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator, Protocol

import numpy as np
import torch


@dataclass
class Bucket:
    """A flat uint8 buffer and the tensors packed in it, in order."""

    data: np.ndarray
    entries: list[tuple[str, str, tuple[int, ...], int]] = field(default_factory=list)  # name, dtype, shape, offset

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


def _as_bytes(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()


def pack_buckets(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> list[Bucket]:
    """Pack tensors, in order, into buckets of at most ``bucket_bytes`` (a larger tensor gets its own)."""
    buckets: list[Bucket] = []
    pending: list[tuple[str, torch.Tensor]] = []
    size = 0

    def flush() -> None:
        nonlocal pending, size
        if not pending:
            return
        data = np.empty(size, np.uint8)
        entries, offset = [], 0
        for name, t in pending:
            raw = _as_bytes(t)
            data[offset: offset + raw.nbytes] = raw
            entries.append((name, str(t.dtype).removeprefix("torch."), tuple(t.shape), offset))
            offset += raw.nbytes
        buckets.append(Bucket(data, entries))
        pending, size = [], 0

    for name, t in named:
        nbytes = t.numel() * t.element_size()
        if pending and size + nbytes > bucket_bytes:
            flush()
        pending.append((name, t))
        size += nbytes
    flush()
    return buckets


def unpack_bucket(bucket: Bucket) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) views over the bucket's buffer (no copy)."""
    raw = torch.from_numpy(bucket.data) if bucket.data.flags.writeable else torch.from_numpy(bucket.data.copy())
    for name, dtype, shape, offset in bucket.entries:
        dt = getattr(torch, dtype)
        n = int(np.prod(shape, dtype=np.int64)) * torch.empty(0, dtype=dt).element_size()
        yield name, raw[offset: offset + n].view(dt).reshape(shape)


class WeightTransport(Protocol):
    name: str

    def send(self, named: Iterable[tuple[str, torch.Tensor]], version: int) -> object:
        """Learner rank 0: package the weights; returns what the driver hands to receivers."""

    def receive(self, payload: object) -> Iterator[tuple[str, torch.Tensor]]:
        """Rollout side: turn the payload back into (name, tensor) pairs."""


class ObjectStoreTransport:
    """Buckets as Ray object-store values: the learner returns them, Ray moves the bytes."""

    name = "object_store"

    def __init__(self, bucket_mib: int = 64):
        self.bucket_bytes = bucket_mib * 2**20

    def send(self, named: Iterable[tuple[str, torch.Tensor]], version: int) -> list[Bucket]:
        return pack_buckets(named, self.bucket_bytes)

    def receive(self, payload: list[Bucket]) -> Iterator[tuple[str, torch.Tensor]]:
        for bucket in payload:
            yield from unpack_bucket(bucket)


TRANSPORTS = {"object_store": ObjectStoreTransport}


def make_transport(name: str, **options) -> WeightTransport:
    if name not in TRANSPORTS:
        raise ValueError(f"learner.weight_transport: unknown transport {name!r}; "
                         f"choose one of {sorted(TRANSPORTS)}")
    return TRANSPORTS[name](**options)
