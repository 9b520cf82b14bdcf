import numpy as np
import pytest
import torch

from learner.weight_sync import ObjectStoreTransport, make_transport, pack_buckets, unpack_bucket


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_buckets_round_trip_bit_exact(dtype):
    g = torch.Generator().manual_seed(0)
    named = [(f"layer{i}.w", torch.randn(int(n), 7, generator=g).to(dtype)) for i, n in enumerate([3, 50, 1, 400, 9])]
    buckets = pack_buckets(named, bucket_bytes=1000)
    assert len(buckets) > 1  # the limit splits them
    assert all(b.nbytes <= 1000 or len(b.entries) == 1 for b in buckets)
    back = [pair for b in buckets for pair in unpack_bucket(b)]
    assert [n for n, _ in back] == [n for n, _ in named]
    for (_, a), (_, b) in zip(named, back):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.view(torch.uint8) if a.dtype != torch.float32 else a,
                           b.view(torch.uint8) if b.dtype != torch.float32 else b)


def test_transport_registry():
    t = make_transport("object_store", bucket_mib=1)
    assert isinstance(t, ObjectStoreTransport)
    named = [("a", torch.arange(6.0).reshape(2, 3))]
    out = dict(t.receive(t.send(named, version=1)))
    assert torch.equal(out["a"], named[0][1])
    with pytest.raises(ValueError, match="learner.weight_transport"):
        make_transport("carrier_pigeon")


def test_object_store_export_keeps_rank0s_buckets_and_every_rank_takes_every_gather():
    gathers = []

    def gathered(rank0: bool):
        for bucket in ([("a", torch.ones(3))], [("b", torch.zeros(2, 2))]):
            gathers.append(rank0)
            yield bucket if rank0 else []  # other ranks get empty lists (learner.student_dir.gathered_buckets)

    t = make_transport("object_store", bucket_mib=1)
    payload = t.export(gathered(True), version=3, is_rank0=True)
    assert [name for bucket in payload for name, _ in unpack_bucket(bucket)] == ["a", "b"]
    assert t.export(gathered(False), version=3, is_rank0=False) is None
    assert gathers == [True, True, False, False]


def test_unpack_of_read_only_buffer_copies():
    # Ray hands out read-only numpy arrays from the object store.
    (bucket,) = pack_buckets([("x", torch.ones(4))], 1 << 20)
    bucket.data.setflags(write=False)
    (name, t), = list(unpack_bucket(bucket))
    assert name == "x" and torch.equal(t, torch.ones(4))
    assert np.shares_memory(bucket.data, t.numpy()) is False
