"""The one workload the bank benchmarks replay, and the one model of a `Step`'s bytes."""

import uuid

import numpy as np
import pytest

from bank_server import tensors
from benchmarks.workload import MOMENTUM, StepWorkload, step_message_bytes
from protos import bank_pb2


def test_batches_are_distinct_indices_in_range_with_unit_features():
    work = StepWorkload(rows=1000, dim=8, batch=50, seed=3)
    for i in range(70):  # past the end of the cycle too
        idx, f = work.indices(i), work.features(i)
        assert idx.shape == (50,) and len(np.unique(idx)) == 50 and idx.min() >= 0 and idx.max() < 1000
        assert f.shape == (50, 8) and f.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(f, axis=1), 1, rtol=1e-5)
    assert not np.array_equal(work.indices(0), work.indices(1))


def test_a_seed_gives_the_same_batches_and_another_seed_others():
    a, b, c = (StepWorkload(10**8, 4, 16, seed=s) for s in (1, 1, 2))
    np.testing.assert_array_equal(a.indices(5), b.indices(5))
    np.testing.assert_array_equal(a.features(5), b.features(5))
    assert not np.array_equal(a.indices(5), c.indices(5))


def test_a_batch_larger_than_the_bank_is_refused():
    with pytest.raises(ValueError, match="batch"):
        StepWorkload(rows=10, dim=4, batch=11, seed=0)


@pytest.mark.parametrize("shards", [1, 2, 3])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_step_bytes_match_the_messages_a_fresh_client_and_its_shards_exchange(shards, dtype):
    batch, negatives, dim, rows = 101, 1001, 16, 5000  # neither divisible by 2 or 3
    rng = np.random.default_rng(0)
    update = rng.permutation(batch)  # routed by g % shards, as the client does
    lookup = rng.permutation(batch)
    features = rng.standard_normal((batch, dim)).astype(np.float32)
    client_id = uuid.uuid4().hex
    request_bytes = answer_bytes = 0
    for s in range(shards):
        mine, look = update % shards == s, lookup % shards == s
        k = len(range(s, negatives, shards))
        request = bank_pb2.StepRequest(
            update=bank_pb2.UpdateRequest(indices=tensors.encode(update[mine]), features=tensors.encode(features[mine]),
                                          momentum=MOMENTUM, client_id=client_id, sequence=s + 1),
            lookup_indices=tensors.encode(lookup[look]), sample_k=k)
        answer = bank_pb2.StepResponse(
            update_applied=True, rows=tensors.encode(rng.standard_normal((int(look.sum()), dim)).astype(dtype)),
            sample_indices=tensors.encode(rng.integers(0, rows, k)),
            sample_rows=tensors.encode(rng.standard_normal((k, dim)).astype(dtype)))
        request_bytes += request.ByteSize()
        answer_bytes += answer.ByteSize()
    sizes = step_message_bytes(batch, negatives, dim, dtype, shards)
    assert len(sizes) == shards
    assert (sum(r for r, _ in sizes), sum(a for _, a in sizes)) == (request_bytes, answer_bytes)
