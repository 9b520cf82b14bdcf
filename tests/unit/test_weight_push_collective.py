"""The collective weight transport without Ray: its header, and a real gloo side band.

The members run as threads of this process, each with its own ``ProcessGroupGloo`` on one
``TCPStore``, exactly as learner rank 0 and the student actors build theirs; the full path
(Ray actors, DeepSpeed ZeRO-3, vLLM) is tests/integration/test_weight_push.py.
"""
import threading
import time

import pytest
import torch

from learner.student_dir import with_tied_head
from learner.weight_sync import (CollectiveTransport, decode_header, encode_header, join_group, make_transport,
                                 pack_buckets)


def named_tensors():
    g = torch.Generator().manual_seed(0)
    return [("model.embed_tokens.weight", torch.randn(48, 8, generator=g)),
            ("layers.0.w", torch.randn(300, 7, generator=g).to(torch.bfloat16)),
            ("layers.0.b", torch.randn(5, generator=g).to(torch.float16)),
            ("scale", torch.tensor(2.5)),  # a 0-d tensor: shape ()
            ("layers.1.w", torch.randn(2, 3, 4, generator=g))]


def test_header_round_trip():
    (bucket,) = pack_buckets(named_tensors(), 1 << 20)
    entries = decode_header(encode_header(bucket.entries))
    assert entries == bucket.entries
    assert [shape for _, _, shape, _ in entries][3] == ()
    assert [dtype for _, dtype, _, _ in entries][:3] == ["float32", "bfloat16", "float16"]


def run_members(size: int, work, timeout_s: float = 20.0) -> list:
    """Run ``work(group)`` on ranks 0..size-1 of a fresh gloo side band (threads); results by rank."""
    import torch.distributed as dist
    from datetime import timedelta

    store = dist.TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=timeout_s), wait_for_workers=False)
    results, errors = [None] * size, []

    def member(rank):
        try:
            rendezvous = store if rank == 0 else ("127.0.0.1", store.port)
            results[rank] = work(join_group(rendezvous, rank, size, "gloo", timeout_s))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append((rank, err))

    threads = [threading.Thread(target=member, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s * 2)
    return results, errors


def seconds_until_receive_fails(transport: CollectiveTransport) -> float:
    """A receiver whose sender left the side band: how long until its ``receive`` raised."""
    t0 = time.time()
    with pytest.raises(RuntimeError):
        list(transport.receive())
    return time.time() - t0


def test_buckets_broadcast_bit_exact_to_every_receiver():
    named = with_tied_head(named_tensors(), ("lm_head.weight", "model.embed_tokens.weight"))

    def work(group):
        transport = make_transport("collective", bucket_mib=1, group=group)
        assert isinstance(transport, CollectiveTransport)
        if group.rank == 0:
            transport.bucket_bytes = 2000  # several buckets, as a big model's push has
            sent = transport.export(iter([named[:3], named[3:]]), version=1, is_rank0=True)  # two gathers
            assert sent["error"] is None and sent["bytes"] > 0
            return sent["buckets"]
        return [(n, t.clone()) for n, t in transport.receive()]

    results, errors = run_members(3, work)
    assert not errors
    assert results[0] > 2
    for got in results[1:]:
        assert [n for n, _ in got] == [n for n, _ in named]
        assert got[-1][0] == "lm_head.weight"  # the tied head is named in the push
        for (_, want), (_, have) in zip(named, got):
            assert have.dtype == want.dtype and have.shape == want.shape
            assert torch.equal(have.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8))


def test_a_sender_that_leaves_fails_its_receivers_at_once():
    """A broken push must not leave the students waiting out the side band's timeout."""

    def work(group):
        transport = CollectiveTransport(group=group)
        if group.rank == 0:
            transport.send(named_tensors()[:1], version=1)
            group.close()  # what learner rank 0 does when its broadcast fails
            return None
        return seconds_until_receive_fails(transport)

    results, errors = run_members(2, work, timeout_s=60.0)
    assert not errors
    assert results[1] < 10.0


def test_a_failed_send_is_reported_leaves_the_band_and_still_takes_every_gather():
    """What ``LearnerWorker.export_weights`` relies on: a send that fails on rank 0 is reported
    (the driver falls back), not raised; rank 0 leaves the side band, so the students stop at
    once, even while rank 0 still holds its group (as the learner actor does until the driver
    tells it to drop it); and every gathered bucket is still consumed, because under ZeRO-3 the
    other learner ranks are in those gathers."""
    gathers, received = [], threading.Event()

    def gathered():
        buckets = [named_tensors()[:2], [("unreadable", torch.empty(3, device="meta"))], named_tensors()[2:]]
        for i, bucket in enumerate(buckets):
            gathers.append(i)
            yield bucket

    def work(group):
        transport = make_transport("collective", bucket_mib=1, group=group)
        if group.rank == 0:
            sent = transport.export(gathered(), version=1, is_rank0=True)
            received.wait(30.0)  # still holding ``group``
            return sent, group.closed
        try:
            return seconds_until_receive_fails(transport)
        finally:
            received.set()

    results, errors = run_members(2, work, timeout_s=60.0)
    assert not errors
    (sent, left), waited = results
    assert gathers == [0, 1, 2] and left
    assert sent["buckets"] == 1 and sent["error"].startswith("learner-0: NotImplementedError: ")
    assert waited < 10.0
    # Another learner rank only takes part in the gathers.
    assert CollectiveTransport().export(iter([[], []]), version=1, is_rank0=False) is None


def test_sending_without_a_group_says_so():
    with pytest.raises(RuntimeError, match="no side-band group"):
        CollectiveTransport().send(named_tensors(), version=1)
