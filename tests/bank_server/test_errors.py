"""Bad input over the wire: a clear status naming the field, and no row changes."""

import grpc
import numpy as np
import pytest

from bank_server import tensors
from bank_server.client import BankRpcError
from bank_server.errors import InvalidArgument
from protos import bank_pb2, bank_pb2_grpc

N, D = 20, 8


@pytest.fixture
def bank(make_bank):
    bank = make_bank(2, N, D, "float32", max_message_bytes=1 << 16)
    channel = grpc.insecure_channel(bank.addresses[0])
    stub = bank_pb2_grpc.MemoryBankStub(channel)
    client = bank.client(max_message_bytes=1 << 16)
    before = client.lookup(np.arange(N)).copy()
    yield stub, client, before
    np.testing.assert_array_equal(client.lookup(np.arange(N)), before)  # nothing changed
    assert all(i["updates_applied"] == 0 for i in client.describe())
    client.close()
    channel.close()


def unit_rows(n, dim=D, dtype=np.float32):
    return np.full((n, dim), 1 / np.sqrt(dim), dtype=dtype)


def update(indices, features, momentum=0.5):
    return bank_pb2.UpdateRequest(
        indices=tensors.encode(np.asarray(indices, np.int64)), features=tensors.encode(features), momentum=momentum
    )


def expect(stub_call, request, code, *fragments):
    with pytest.raises(grpc.RpcError) as info:
        stub_call(request)
    assert info.value.code() == code, info.value.details()
    for fragment in fragments:
        assert fragment in info.value.details(), info.value.details()


INVALID = grpc.StatusCode.INVALID_ARGUMENT


def test_indices_out_of_range_or_on_another_shard(bank):
    stub, _, _ = bank
    expect(
        stub.Lookup,
        bank_pb2.LookupRequest(indices=tensors.encode(np.array([0, 20]))),
        INVALID,
        "indices[1] = 20",
        "[0, 20)",
    )
    expect(stub.Lookup, bank_pb2.LookupRequest(indices=tensors.encode(np.array([-2]))), INVALID, "indices[0]")
    expect(stub.Update, update([2, 3], unit_rows(2)), INVALID, "update.indices[1] = 3", "shard 1")
    expect(stub.Update, update([2, 2], unit_rows(2)), INVALID, "update.indices has duplicates")


def test_features_of_wrong_dim_dtype_or_length(bank):
    stub, _, _ = bank
    expect(stub.Update, update([2], unit_rows(1, D + 1)), INVALID, "update.features", f"(n, {D})")
    expect(stub.Update, update([2, 4], unit_rows(1)), INVALID, "update.features has 1 rows")
    request = update([2], unit_rows(1))
    request.features.dtype = bank_pb2.INT64
    expect(stub.Update, request, INVALID, "update.features.dtype")
    request = update([2], unit_rows(1))
    request.features.data = request.features.data[:-4]
    expect(stub.Update, request, INVALID, "update.features", "bytes")
    request = bank_pb2.LookupRequest(indices=tensors.encode(np.array([2])))
    request.indices.shape[:] = [3]
    expect(stub.Lookup, request, INVALID, "indices: shape [3]")


def test_non_finite_features_and_queries(bank):
    stub, _, _ = bank
    bad = unit_rows(2)
    bad[1, 3] = np.nan
    expect(stub.Update, update([2, 4], bad), INVALID, "update.features contains NaN or Inf")
    queries = unit_rows(2)
    queries[0, 0] = np.inf
    expect(
        stub.PartitionSum,
        bank_pb2.PartitionSumRequest(queries=tensors.encode(queries), temperature=0.1),
        INVALID,
        "queries contains NaN or Inf",
    )
    expect(stub.TopK, bank_pb2.TopKRequest(queries=tensors.encode(queries), k=3), INVALID, "queries")
    expect(
        stub.PartitionSum,
        bank_pb2.PartitionSumRequest(queries=tensors.encode(unit_rows(1)), temperature=0),
        INVALID,
        "temperature",
    )


@pytest.mark.parametrize("momentum", [1.0, -0.1, float("nan")])
def test_momentum_outside_unit_interval(bank, momentum):
    stub, _, _ = bank
    expect(stub.Update, update([2], unit_rows(1), momentum), INVALID, "update.momentum")


def test_k_out_of_range(bank):
    stub, client, _ = bank
    expect(stub.Sample, bank_pb2.SampleRequest(k=0), INVALID, "k must be in [1, 20]")
    expect(stub.Sample, bank_pb2.SampleRequest(k=21), INVALID, "k must be in [1, 20]")
    expect(stub.Sample, bank_pb2.SampleRequest(k=-3), INVALID, "k must be in [1, 20]")
    expect(stub.Step, bank_pb2.StepRequest(sample_k=-3), INVALID, "sample_k must be >= 0")
    q = tensors.encode(unit_rows(1))
    expect(stub.TopK, bank_pb2.TopKRequest(queries=q, k=0), INVALID, "k must be in [1, 10]")
    expect(stub.TopK, bank_pb2.TopKRequest(queries=q, k=11), INVALID, "k must be in [1, 10]")
    with pytest.raises(ValueError, match="k must be in"):
        client.topk(unit_rows(1), N + 1)


def test_step_validated_whole(bank):
    stub, _, _ = bank
    request = bank_pb2.StepRequest(
        update=update([2], unit_rows(1)), lookup_indices=tensors.encode(np.array([99])), sample_k=3
    )
    expect(stub.Step, request, INVALID, "lookup_indices[0] = 99")
    request = bank_pb2.StepRequest(update=update([2], unit_rows(1)), sample_k=21)
    expect(stub.Step, request, INVALID, "sample_k")


def test_oversized_messages(bank):
    stub, client, _ = bank
    # The answer would not fit: refused before any work, naming the field.
    big = bank_pb2.LookupRequest(indices=tensors.encode(np.zeros(3000, np.int64)))
    expect(stub.Lookup, big, grpc.StatusCode.RESOURCE_EXHAUSTED, "indices", "max message size")
    # The request itself is over the server's receive limit: gRPC refuses it.
    huge = bank_pb2.LookupRequest(indices=tensors.encode(np.zeros(20000, np.int64)))
    expect(stub.Lookup, huge, grpc.StatusCode.RESOURCE_EXHAUSTED)
    # The client splits the same request into messages that fit.
    assert client.lookup(np.zeros(3000, np.int64)).shape == (3000, D)


def test_client_reports_status_and_address(bank):
    _, client, _ = bank
    with pytest.raises(BankRpcError) as info:
        client.lookup([N + 5])
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.address in client.addresses and "indices[0]" in str(info.value)


def test_client_checks_a_whole_update_before_any_shard_applies_it(bank):
    _, client, _ = bank
    rows = unit_rows(3)
    with pytest.raises(InvalidArgument, match=r"indices\[2\] = 20"):
        client.update([0, 1, 20], rows)
    with pytest.raises(InvalidArgument, match="duplicates"):
        client.update([0, 1, 0], rows)
    rows[2, 0] = np.nan
    with pytest.raises(InvalidArgument, match="NaN"):
        client.update([0, 1, 2], rows)
    assert [d["updates_applied"] for d in client.describe()] == [0] * client.num_shards


@pytest.mark.parametrize("shards", [1, 2])
@pytest.mark.parametrize(
    "indices, features, momentum",
    [
        ([0, 1, 20], unit_rows(3), 0.5),  # out of range
        ([2, 4, 2], unit_rows(3), 0.5),  # duplicate
        ([0, 2], np.full((2, D), np.nan, np.float32), 0.5),  # not finite
        ([0, 2], unit_rows(2)[:, :3], 0.5),  # wrong dim
        ([0, 2], unit_rows(2), 1.0),  # momentum
    ],
)
def test_a_bad_update_reads_the_same_whichever_side_catches_it(make_bank, shards, indices, features, momentum):
    """One set of validators. With two shards the client checks the whole update before
    sending; with one, the shard's own check is enough. Either way: InvalidArgument
    with the message a shard gives a raw Update, and no row changed."""
    bank = make_bank(shards, N, D, "float32", max_message_bytes=1 << 16)
    client = bank.client()
    with grpc.insecure_channel(bank.addresses[0]) as channel:
        with pytest.raises(grpc.RpcError) as raw:  # shard 0 alone, as any client of bank.proto sees it
            bank_pb2_grpc.MemoryBankStub(channel).Update(update(indices, features, momentum))
    assert raw.value.code() == INVALID
    with pytest.raises(InvalidArgument) as caught:
        client.update(indices, features, momentum)
    assert str(caught.value) == raw.value.details()
    assert isinstance(caught.value, BankRpcError) == (shards == 1)  # which side caught it
    assert [d["updates_applied"] for d in client.describe()] == [0] * shards
    client.close()


def test_snapshot_needs_a_directory_and_a_clean_tag(bank):
    stub, _, _ = bank
    expect(stub.Snapshot, bank_pb2.SnapshotRequest(tag="x"), INVALID, "--snapshot-dir")


def test_bad_tag(make_bank, tmp_path):
    bank = make_bank(1, N, D, "float32", snapshot_dir=str(tmp_path))
    with grpc.insecure_channel(bank.addresses[0]) as channel:
        stub = bank_pb2_grpc.MemoryBankStub(channel)
        expect(stub.Snapshot, bank_pb2.SnapshotRequest(tag="../escape"), INVALID, "tag must match")
        expect(stub.Restore, bank_pb2.RestoreRequest(tag="never-written"), grpc.StatusCode.NOT_FOUND, "never-written")


def test_a_step_with_a_bad_read_applies_no_part_of_its_update(bank):
    """The shards refuse a Step whole: a read bad for one shard must not let another
    apply its part of the update, so the client checks the reads first."""
    _, client, _ = bank
    with pytest.raises(InvalidArgument, match=r"lookup_indices\[1\] = 20"):
        client.step(update_indices=[0, 1], update_features=unit_rows(2), lookup_indices=[3, 20], negatives=2)
