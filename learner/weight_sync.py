"""Moving the learner's weights to the rollout engines: buckets and transports.

Weights travel in buckets: each bucket is one flat byte buffer plus a table of
(name, dtype, shape, offset) entries, so a push is a handful of transfers, never one RPC per
parameter. Bytes are dtype-agnostic, which carries bf16 (numpy has no bf16) unchanged.

A transport moves buckets from learner rank 0 to every rollout actor (``WeightTransport``). Each
side builds it by name from ``TRANSPORTS`` (``make_transport``): every learner rank calls
``export`` on the gathered buckets (``LearnerWorker.export_weights``), the rollout side iterates
``receive``. The driver's side of each transport, which actor calls a push makes and what it
falls back to, is ``cluster.weight_push`` (``ROUTES``, under the same names).
- ``object_store``: buckets are numpy arrays in Ray's object store (zero-copy reads on the
  same node). Works everywhere Ray works, so it is the default and the fallback.
- ``collective``: learner rank 0 broadcasts each bucket, as the ZeRO-3 gather yields it, over a
  side-band process group of its own: rank 0 of that group is learner rank 0, ranks 1..N are the
  student rollout actors (gloo on CPU, NCCL when the learner runs on cuda). Per bucket, three
  broadcasts: the lengths (int64 [header bytes, data bytes]; [0, 0] ends the push), the header
  (``Bucket.entries`` as JSON) and the data (one flat uint8 tensor).

How the side-band group is built: learner rank 0 hosts a fresh ``TCPStore`` on a port the OS
picks (port 0: no race between choosing a free port and binding it) and hands its address to
the driver through Ray; then rank 0 and every student construct ``ProcessGroupGloo`` /
``ProcessGroupNCCL`` on that store directly. No ``init_process_group`` is called anywhere: the
learner ranks' default group (DeepSpeed's) is untouched, and a rollout actor holds no global
process-group state that could clash with its engine's (vLLM's own groups on GPU). A group is
formed again (new store, new port, every member) whenever its members change, e.g. after a
student was restarted; a failed broadcast leaves the group (``WeightGroup.close``), which makes
the peers' pending broadcasts fail at once instead of waiting out the timeout.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Iterable, Iterator, Optional, Protocol

import numpy as np
import torch

from services.actor_names import actor_name


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
    yield from _views(raw, bucket.entries)


def _views(raw: torch.Tensor, entries: list) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) views over a flat uint8 tensor (on any device) laid out as ``entries``."""
    for name, dtype, shape, offset in entries:
        dt = getattr(torch, dtype)
        n = int(np.prod(shape, dtype=np.int64)) * torch.empty(0, dtype=dt).element_size()
        yield name, raw[offset: offset + n].view(dt).reshape(shape)


def encode_header(entries: list[tuple[str, str, tuple[int, ...], int]]) -> torch.Tensor:
    """A bucket's table of (name, dtype, shape, offset) as a uint8 tensor (JSON bytes)."""
    return torch.frombuffer(bytearray(json.dumps(entries).encode()), dtype=torch.uint8)


def decode_header(raw: torch.Tensor) -> list[tuple[str, str, tuple[int, ...], int]]:
    """The inverse of ``encode_header`` (shapes come back as tuples)."""
    return [(n, d, tuple(s), int(o)) for n, d, s, o in json.loads(bytes(raw.cpu().numpy()))]


class WeightTransport(Protocol):
    """How buckets travel from learner rank 0 to the student rollout actors.

    Built on each side with ``make_transport(name, bucket_mib=..., group=...)``; ``group`` is the
    side-band membership for a transport that uses one, and ignored by the others.
    """

    name: str  # its key in TRANSPORTS, learner.weight_transport and cluster.weight_push.ROUTES

    def send(self, named: Iterable[tuple[str, torch.Tensor]], version: int) -> object:
        """Learner rank 0: move one gathered bucket's (name, tensor) pairs; returns what it made."""

    def export(self, gathered: Iterable[list[tuple[str, torch.Tensor]]], version: int,
               is_rank0: bool) -> object:
        """Every learner rank: consume every gathered bucket (each may be a ZeRO-3 collective, so
        no rank may stop early) and send them from rank 0. Returns what ``export_weights`` hands
        the driver from rank 0, and None on the other ranks. A failure that the driver can fall
        back from is reported in the result, never raised."""

    def receive(self, payload: object) -> Iterator[tuple[str, torch.Tensor]]:
        """Rollout side: turn the payload back into (name, tensor) pairs."""


class ObjectStoreTransport:
    """Buckets as Ray object-store values: the learner returns them, Ray moves the bytes."""

    name = "object_store"

    def __init__(self, bucket_mib: int = 64, group: Optional[WeightGroup] = None):
        self.bucket_bytes = bucket_mib * 2**20  # ``group`` is ignored: no side band here

    def send(self, named: Iterable[tuple[str, torch.Tensor]], version: int) -> list[Bucket]:
        return pack_buckets(named, self.bucket_bytes)

    def export(self, gathered: Iterable[list[tuple[str, torch.Tensor]]], version: int,
               is_rank0: bool) -> Optional[list[Bucket]]:
        """Rank 0's buckets, which Ray stores as the return value (None on the other ranks)."""
        payload = [b for bucket in gathered for b in self.send(bucket, version)]
        return payload if is_rank0 else None

    def receive(self, payload: list[Bucket]) -> Iterator[tuple[str, torch.Tensor]]:
        for bucket in payload:
            yield from unpack_bucket(bucket)


@dataclass
class WeightGroup:
    """This process's membership of a side-band group: rank 0 is learner rank 0, rank i the
    i-th student rollout actor. ``store`` keeps the rendezvous alive (rank 0 hosts it)."""

    pg: Any
    rank: int
    size: int
    device: torch.device
    store: Any

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``tensor`` into every member's ``tensor`` (in place); returns it."""
        if self.pg is None:
            raise RuntimeError("this side-band group was left (WeightGroup.close)")
        self.pg.broadcast(tensor, 0).wait()
        return tensor

    def close(self) -> None:
        """Leave the group: peers blocked in a broadcast with this member fail at once. The
        process group is shut down and dropped here, whoever still holds this object: its
        sockets close when it is freed (a gloo group's ``shutdown`` alone leaves the peers
        waiting out the timeout). Leaving twice is leaving once."""
        pg, self.pg = self.pg, None
        if pg is None:
            return
        try:
            pg.shutdown()
        except Exception:  # noqa: BLE001 - a broken group is being left anyway
            pass

    @property
    def closed(self) -> bool:
        return self.pg is None


def failure_line(who: str, err: BaseException) -> str:
    """One line for the driver's log: who failed, the error's type and its first line."""
    lines = str(err).strip().splitlines()
    return f"{who}: {type(err).__name__}: {lines[0][:300] if lines else ''}"


def host_rendezvous(timeout_s: float) -> tuple[Any, tuple[str, int]]:
    """Learner rank 0: a fresh TCPStore on a port the OS picks; returns it and its (ip, port)."""
    import ray
    import torch.distributed as dist

    ip = ray.util.get_node_ip_address()
    store = dist.TCPStore(ip, 0, None, True, timedelta(seconds=timeout_s), wait_for_workers=False)
    return store, (ip, int(store.port))


def join_group(rendezvous: Any, rank: int, size: int, backend: str, timeout_s: float) -> WeightGroup:
    """Form the side-band group as ``rank`` of ``size``; every member calls this at the same time.

    ``rendezvous``: rank 0's own store (from ``host_rendezvous``), or its (ip, port) elsewhere.
    ``backend``: "gloo" (CPU tensors) or "nccl" (tensors on this process's current GPU).
    Blocks until all members joined; raises after ``timeout_s`` if one does not.
    """
    import torch.distributed as dist

    timeout = timedelta(seconds=timeout_s)
    store = rendezvous
    if isinstance(rendezvous, (tuple, list)):
        store = dist.TCPStore(rendezvous[0], int(rendezvous[1]), None, False, timeout)
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        pg = dist.ProcessGroupNCCL(store, rank, size, options)
        device = torch.device("cuda", torch.cuda.current_device())
    elif backend == "gloo":
        pg, device = dist.ProcessGroupGloo(store, rank, size, timeout), torch.device("cpu")
    else:
        raise ValueError(f"side-band backend must be gloo or nccl, not {backend!r}")
    return WeightGroup(pg, rank, size, device, store)


class CollectiveTransport:
    """Buckets broadcast from learner rank 0 over a ``WeightGroup`` (see the module docstring).

    Rank 0 calls ``send`` once per gathered bucket and ``finish`` after the last (``export`` does
    both); every other member iterates ``receive`` to its end, at the same time. Nothing passes
    through the driver.
    """

    name = "collective"

    def __init__(self, bucket_mib: int = 64, group: Optional[WeightGroup] = None):
        self.bucket_bytes = bucket_mib * 2**20
        self.group = group

    def _group(self) -> WeightGroup:
        if self.group is None:
            raise RuntimeError("the collective weight transport has no side-band group: the driver "
                               "forms one (cluster.weight_push.CollectiveRoute) before the first push")
        return self.group

    def send(self, named: Iterable[tuple[str, torch.Tensor]], version: int) -> dict[str, int]:
        """Rank 0: broadcast ``named`` as buckets; returns {"buckets": n, "bytes": data bytes}."""
        group, sent = self._group(), {"buckets": 0, "bytes": 0}
        for bucket in pack_buckets(named, self.bucket_bytes):
            header = encode_header(bucket.entries)
            group.broadcast(torch.tensor([header.numel(), bucket.nbytes], dtype=torch.int64, device=group.device))
            group.broadcast(header.to(group.device))
            group.broadcast(torch.from_numpy(bucket.data).to(group.device))
            sent["buckets"] += 1
            sent["bytes"] += bucket.nbytes
        return sent

    def finish(self) -> None:
        """Rank 0: tell the receivers that the push is complete."""
        group = self._group()
        group.broadcast(torch.zeros(2, dtype=torch.int64, device=group.device))

    def export(self, gathered: Iterable[list[tuple[str, torch.Tensor]]], version: int,
               is_rank0: bool) -> Optional[dict[str, Any]]:
        """Broadcast every gathered bucket from rank 0, then ``finish``; returns {"buckets",
        "bytes", "error"} on rank 0 (None elsewhere), ``error`` None when all went well.

        A failed broadcast stops rank 0's sending and leaves the side band (its peers stop at
        once), but never the gathers: the other ranks are in them and must not be left hanging.
        """
        sent, error = {"buckets": 0, "bytes": 0}, None
        for bucket in gathered:
            if not is_rank0 or error is not None:
                continue  # still take part in every gather
            try:
                for key, n in self.send(bucket, version).items():
                    sent[key] += n
            except Exception as err:  # noqa: BLE001 - reported to the driver, which falls back
                error = self._leave(err)
        if not is_rank0:
            return None
        if error is None:
            try:
                self.finish()
            except Exception as err:  # noqa: BLE001
                error = self._leave(err)
        return {**sent, "error": error}

    def _leave(self, err: BaseException) -> str:
        """Leave the side band after ``err`` (the sender is learner rank 0); returns the log line."""
        if self.group is not None:
            self.group.close()
        return failure_line(actor_name("learner", 0), err)

    def receive(self, payload: object = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Other ranks: yield (name, tensor) views, a bucket at a time, until rank 0's ``finish``."""
        group = self._group()
        while True:
            lengths = group.broadcast(torch.zeros(2, dtype=torch.int64, device=group.device)).tolist()
            if lengths == [0, 0]:
                return
            entries = decode_header(group.broadcast(torch.empty(lengths[0], dtype=torch.uint8, device=group.device)))
            yield from _views(group.broadcast(torch.empty(lengths[1], dtype=torch.uint8, device=group.device)),
                              entries)


TRANSPORTS = {"object_store": ObjectStoreTransport, "collective": CollectiveTransport}


def make_transport(name: str, **options) -> WeightTransport:
    """The transport ``learner.weight_transport`` names, built with ``options``."""
    if name not in TRANSPORTS:
        raise ValueError(f"learner.weight_transport: unknown transport {name!r}; "
                         f"choose one of {sorted(TRANSPORTS)}")
    return TRANSPORTS[name](**options)
