"""Every RPC through BankClient and real servers on loopback, against a numpy reference."""

import threading

import numpy as np
import pytest
import torch
from scipy import stats

from bank_server.client import BankClient, LayoutError, placed_draws
from bank_server.errors import InvalidArgument
from tests.conftest import free_port, reference_bank

N, D = 97, 16


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(params=[1, 2, 3], ids=lambda s: f"S{s}")
def bank(request, make_bank):
    bank = make_bank(request.param, N, D, "float32", seed=4)
    client = bank.client()
    yield client, reference_bank(request.param, N, D, "float32", seed=4)
    client.close()


def test_describe_reports_layout(bank):
    client, _ = bank
    infos = client.describe()
    assert [i["shard_id"] for i in infos] == list(range(client.num_shards))
    assert sum(i["rows_held"] for i in infos) == N
    assert {(i["total_rows"], i["dim"], i["dtype"]) for i in infos} == {(N, D, "float32")}


def test_lookup_returns_rows_in_request_order(bank):
    client, ref = bank
    idx = np.array([5, 96, 0, 5, 33, 2, 1])
    np.testing.assert_array_equal(client.lookup(idx), ref[idx])
    assert client.lookup(np.array([], dtype=np.int64)).shape == (0, D)


def test_array_likes_in_numpy_out(bank):
    # The client speaks numpy; CPU tensors go in through np.asarray (trainer.bank_feed adapts torch).
    client, ref = bank
    out = client.lookup(torch.tensor([3, 1]))
    assert isinstance(out, np.ndarray)
    np.testing.assert_array_equal(out, ref[[3, 1]])
    log_z, expected = client.partition_sums(torch.from_numpy(unit(ref[:2])), 0.1)
    assert isinstance(log_z, np.ndarray) and expected.shape == (2, D)


def test_update_matches_formula_and_is_applied_once(bank):
    client, ref = bank
    idx = np.array([7, 3, 90, 11])
    f = unit(np.random.default_rng(0).standard_normal((4, D)).astype(np.float32))
    client.update(idx, f, momentum=0.5)
    expected = unit(0.5 * ref[idx] + 0.5 * f)
    np.testing.assert_allclose(client.lookup(idx), expected, atol=1e-6)


def test_step_updates_then_reads_and_samples(bank):
    client, ref = bank
    f = unit(np.ones((2, D), np.float32))
    result = client.step(
        update_indices=[4, 8], update_features=f, momentum=0.0, lookup_indices=[8, 9, 4], negatives=50, seed=1
    )
    np.testing.assert_allclose(result.rows, np.stack([f[1], ref[9], f[0]]), atol=1e-6)
    assert result.negative_indices.shape == (50,) and result.negative_rows.shape == (50, D)
    current = client.lookup(result.negative_indices)
    np.testing.assert_array_equal(result.negative_rows, current)
    again = client.step(lookup_indices=[9], negatives=50, seed=1)
    np.testing.assert_array_equal(again.negative_indices, result.negative_indices)


def test_sample_is_uniform_over_all_rows(bank):
    client, _ = bank
    draws = [client.sample(N, seed=seed) for seed in range(300)]
    idx = np.concatenate([d[0] for d in draws])
    assert idx.min() >= 0 and idx.max() < N
    counts = np.bincount(idx, minlength=N)
    assert stats.chisquare(counts).pvalue > 1e-4
    np.testing.assert_array_equal(draws[0][1], client.lookup(draws[0][0]))
    unseeded = np.concatenate([client.sample(N)[0] for _ in range(300)])
    assert stats.chisquare(np.bincount(unseeded, minlength=N)).pvalue > 1e-4
    np.testing.assert_array_equal(client.sample(20, seed=3)[0], client.sample(20, seed=3)[0])


def test_partition_sums_match_direct_logsumexp(bank):
    client, ref = bank
    q = unit(np.random.default_rng(2).standard_normal((6, D)).astype(np.float32))
    log_z, expected = client.partition_sums(q, 0.07)
    logits = q.astype(np.float64) @ ref.T.astype(np.float64) / 0.07
    ref_log_z = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    p = np.exp(logits - ref_log_z[:, None])
    np.testing.assert_allclose(log_z, ref_log_z, rtol=1e-5)
    np.testing.assert_allclose(expected, p @ ref, atol=1e-5)


def test_topk_matches_sorted_cosine(bank):
    client, ref = bank
    q = np.random.default_rng(3).standard_normal((5, D)).astype(np.float32)
    sims, idx = client.topk(q, 40)
    cos = unit(q) @ ref.T
    order = np.argsort(-cos, axis=1)[:, :40]
    np.testing.assert_array_equal(idx, order)
    np.testing.assert_allclose(sims, np.take_along_axis(cos, order, 1), rtol=1e-5)
    assert client.topk(q, N)[1].shape == (5, N)


def test_small_messages_give_the_same_answers(make_bank):
    bank = make_bank(2, N, D, "float32", seed=4)
    ref = reference_bank(2, N, D, "float32", seed=4)
    whole, split = bank.client(), bank.client(chunk_bytes=200)
    idx = np.arange(N)[::-1].copy()
    np.testing.assert_array_equal(split.lookup(idx), ref[idx])
    q = unit(ref[:9])
    np.testing.assert_allclose(split.partition_sums(q, 0.1)[0], whole.partition_sums(q, 0.1)[0], rtol=1e-6)
    np.testing.assert_array_equal(split.topk(q, 30)[1], whole.topk(q, 30)[1])
    a = split.sample(90, seed=5)
    assert a[0].shape == (90,) and a[1].shape == (90, D)
    np.testing.assert_array_equal(a[1], ref[a[0]])
    f = unit(np.ones((N, D), np.float32))
    assert split.update(idx, f, momentum=0.0) > 2  # it took several messages
    np.testing.assert_allclose(split.lookup(idx), f, atol=1e-6)
    split.close()
    whole.close()


def test_a_step_is_one_message_per_shard_and_one_that_might_not_fit_is_refused_before_it_is_sent(make_bank):
    bank = make_bank(2, N, D, "float32", max_message_bytes=8192)
    client = bank.client()
    assert client.max_message_bytes == 8192  # the shards' limit
    f = unit(np.ones((10, D), np.float32))
    result = client.step(
        update_indices=np.arange(10), update_features=f, momentum=0.0, lookup_indices=np.arange(10), negatives=20
    )
    assert result.updates_applied == 2
    np.testing.assert_allclose(result.rows, f, atol=1e-6)
    # All 97 reads and 50 draws might fall on one shard: 13,904 bytes with the framing.
    with pytest.raises(InvalidArgument) as refused:
        client.step(update_indices=[0], update_features=-f[:1], momentum=0.0, lookup_indices=np.arange(N), negatives=50)
    assert "13904 bytes" in str(refused.value) and "limit of 8192 bytes" in str(refused.value)
    assert "--max-message-mb 1 " in str(refused.value)
    assert [d["updates_applied"] for d in client.describe()] == [1, 1]  # nothing of it was sent
    client.close()


def test_the_message_limit_for_a_run_holds_its_largest_step():
    from bank_server.protocol import DEFAULT_MAX_MESSAGE_BYTES, message_limit, step_message_bytes

    assert message_limit(256, 4096, 128, "float16") == DEFAULT_MAX_MESSAGE_BYTES  # the usual run: 1.1 MB
    # 65,536 float32 negatives of 128: 34 MB, should they all come from one shard.
    assert message_limit(256, 65536, 128, "float32") == 65536 * (8 + 512) + 256 * 512 + 4096
    assert step_message_bytes(1000, 0, 0, 8, "float16") == 1000 * (8 + 8 * 4) + 4096  # an update's request


def test_a_step_over_several_shards_starts_no_thread_and_close_ends_its_threads(make_bank, monkeypatch):
    """A fan-out's calls but the last run on the client's own threads, kept from Step to
    Step (a gRPC future starts a thread whenever its channel has no call in flight)."""
    client = make_bank(3, N, D, "float32").client()
    f = unit(np.ones((4, D), np.float32))

    def step():
        client.step(update_indices=[1, 2, 3, 4], update_features=f, lookup_indices=[5, 6, 7], negatives=20)

    step()  # the first may start the client's threads
    started, start = [], threading.Thread.start
    monkeypatch.setattr(threading.Thread, "start", lambda thread: (started.append(thread.name), start(thread))[-1])
    for _ in range(20):
        step()
    # The client's own pool and the in-process servers' (bank_N) may add a worker when a
    # call comes just before the last one's worker is marked idle; no other thread may start.
    mine = f"bank-client-{client.client_id[:8]}"
    assert [name for name in started if not name.startswith((mine, "bank_"))] == []
    client.close()
    assert not [t.name for t in threading.enumerate() if t.name.startswith(mine)]


def test_client_refuses_an_incomplete_or_mixed_layout(make_bank):
    two = make_bank(2, N, D, "float32")
    other = make_bank(2, N + 1, D, "float32")
    with pytest.raises(LayoutError, match="2 shard"):
        BankClient(two.addresses[:1])
    with pytest.raises(LayoutError, match="total_rows"):
        BankClient([two.addresses[0], other.addresses[1]])
    with pytest.raises(LayoutError, match=r"missing \[1\], repeated \[0\]"):
        BankClient([two.addresses[0], two.addresses[0]])
    reversed_order = BankClient(two.addresses[::-1])
    assert reversed_order.addresses == two.addresses
    reversed_order.close()


def test_one_address_template_names_every_shard(make_bank):
    # Distinct loopback hosts on one port, as a StatefulSet's pods share a port.
    port = free_port()
    bank = make_bank(3, N, D, "float32", port=port, hosts=[f"127.0.0.1{s}" for s in range(3)])
    with BankClient(f"127.0.0.1{{shard}}:{port}") as client:
        assert client.addresses == bank.addresses == [f"127.0.0.1{s}:{port}" for s in range(3)]
        np.testing.assert_array_equal(client.lookup([0, 1, 2, 95]), reference_bank(3, N, D)[[0, 1, 2, 95]])


def test_a_client_from_bank_proto_alone_reads_every_step_answer(make_bank):
    """The server's hand-written answers, read by protobuf's generated stub: an update
    applied, the same update retried (answered as not applied), and Steps with only
    reads or only draws."""
    import grpc

    from bank_server import tensors
    from protos import bank_pb2, bank_pb2_grpc

    bank = make_bank(1, N, D, "float32", seed=4)
    ref = reference_bank(1, N, D, "float32", seed=4)
    f = unit(np.ones((2, D), np.float32))
    update = bank_pb2.UpdateRequest(
        indices=tensors.encode(np.array([3, 5])),
        features=tensors.encode(f),
        momentum=0.0,
        client_id="proto-only",
        sequence=1,
    )
    with grpc.insecure_channel(bank.addresses[0]) as channel:
        stub = bank_pb2_grpc.MemoryBankStub(channel)
        step = bank_pb2.StepRequest(update=update, lookup_indices=tensors.encode(np.array([5, 6])), sample_k=7)
        first, retried = stub.Step(step), stub.Step(step)
        assert first.update_applied and not retried.update_applied
        now = ref.copy()
        now[[3, 5]] = f  # momentum 0: the update's features themselves
        for answer in (first, retried):
            np.testing.assert_allclose(tensors.decode(answer.rows, "rows"), now[[5, 6]], atol=1e-6)
            drawn = tensors.decode(answer.sample_indices, "sample_indices")
            np.testing.assert_allclose(tensors.decode(answer.sample_rows, "sample_rows"), now[drawn], atol=1e-6)
        reads_only = stub.Step(bank_pb2.StepRequest(lookup_indices=tensors.encode(np.array([9]))))
        assert not reads_only.update_applied and not reads_only.HasField("sample_rows")
        np.testing.assert_array_equal(tensors.decode(reads_only.rows, "rows"), ref[[9]])
        draws_only = stub.Step(bank_pb2.StepRequest(sample_k=4, sample_seed=2))
        assert not draws_only.HasField("rows") and list(draws_only.sample_rows.shape) == [4, D]
        nothing = stub.Step(bank_pb2.StepRequest(lookup_indices=tensors.encode(np.array([], np.int64))))
        assert list(nothing.rows.shape) == [0, D] and nothing.rows.data == b""
        sample = stub.Sample(bank_pb2.SampleRequest(k=3, seed=1))
        np.testing.assert_array_equal(tensors.decode(sample.rows, "rows"), ref[tensors.decode(sample.indices, "i")])
        looked_up = stub.Lookup(bank_pb2.LookupRequest(indices=tensors.encode(np.array([0, 96]))))
        np.testing.assert_array_equal(tensors.decode(looked_up.rows, "rows"), ref[[0, 96]])


def test_each_shards_draws_fill_its_places_in_order():
    places = [np.array([0, 2, 4]), np.array([1, 3])]
    draws = {
        0: [(np.arange(2), np.full((2, 4), 1, np.float16)), (np.arange(2, 3), np.full((1, 4), 3, np.float16))],
        1: [(np.arange(3, 5), np.full((2, 4), 2, np.float16))],
    }
    idx, rows = placed_draws(5, places, draws, ["a:1", "b:2"], 4, np.float16)
    assert idx.tolist() == [0, 3, 1, 4, 2]
    np.testing.assert_array_equal(rows[:, 0], [1, 2, 1, 2, 3])


def test_a_shard_answering_fewer_draws_than_asked_is_an_error_not_a_short_answer():
    from bank_server.client import BankRpcError

    def placed(k, places, draws):
        return placed_draws(k, places, draws, ["a:1", "b:2"], 4, np.float16)

    places = [np.array([0, 2, 4]), np.array([1, 3])]
    short = {0: [(np.arange(3), np.ones((3, 4), np.float16))], 1: [(np.arange(1), np.ones((1, 4), np.float16))]}
    with pytest.raises(BankRpcError, match="shard 1 answered 1 draws for the 2 it was asked for"):
        placed(5, places, short)
    too_many = {0: [(np.arange(4), np.ones((4, 4), np.float16))], 1: [(np.arange(2), np.ones((2, 4), np.float16))]}
    with pytest.raises(BankRpcError, match="shard 0 answered 4 draws for the 3"):
        placed(5, places, too_many)
    unasked = {0: [(np.arange(5), np.ones((5, 4), np.float16))], 1: [(np.arange(1), np.ones((1, 4), np.float16))]}
    with pytest.raises(BankRpcError, match="shard 1 answered 1 draws for the 0"):
        placed(5, [np.arange(5), np.arange(0)], unasked)
    with pytest.raises(BankRpcError, match="shard 0 answered 3 draws for the 4"):
        placed(4, None, {0: [(np.arange(3), np.ones((3, 4), np.float16))]})


@pytest.mark.parametrize("rows, shards", [(5, 4), (13, 12)])
def test_each_negative_goes_to_a_shard_in_proportion_to_its_rows(rows, shards):
    """Shards of unequal size (5 rows on 4 shards: 2, 1, 1, 1) get their share of the
    places, every place exactly once, in increasing order within a shard."""
    from bank_server.client import negative_places
    from bank_server.shard import rows_on_shard

    rng = np.random.default_rng(0)
    counts = np.zeros(shards)
    for _ in range(200):
        places = negative_places(100, rows, shards, rng)
        assert len(places) == shards and sorted(np.concatenate(places).tolist()) == list(range(100))
        assert all((np.diff(where) > 0).all() for where in places)
        counts += [len(where) for where in places]
    expected = 20_000 * np.array([rows_on_shard(rows, shards, s) for s in range(shards)]) / rows
    assert stats.chisquare(counts, expected).pvalue > 1e-4
    assert negative_places(100, rows, 1, rng) is None


def test_every_place_of_a_draw_is_uniform_over_the_shards_not_only_the_whole(bank):
    """Shards' draws are interleaved at random: the first and the last negative of a Step
    each come from shard s with probability rows_s / N (a concatenation would always
    start with shard 0's)."""
    client, _ = bank
    if client.num_shards == 1:
        pytest.skip("one shard: its draws are the answer as they come")
    first, last = [], []
    for seed in range(400):
        idx = client.step(lookup_indices=[0], negatives=6, seed=seed).negative_indices
        first.append(idx[0] % client.num_shards)
        last.append(idx[-1] % client.num_shards)
    expected = 400 * client.shard_rows / N
    for seen in (first, last):
        assert stats.chisquare(np.bincount(seen, minlength=client.num_shards), expected).pvalue > 1e-4


def test_when_several_shards_refuse_the_first_shards_error_is_raised(make_bank):
    """Calls on the client's threads and on the caller's come back in any order; the error
    named is shard 0's."""
    from bank_server.client import RequestRejected

    bank = make_bank(2, N, D, "float32")
    client = bank.client()
    for _ in range(3):
        with pytest.raises(RequestRejected) as info:
            client.lookup(np.array([N, N + 1]))  # N + 1 on shard 0, N on shard 1: both out of range
        assert f"= {N + 1} is outside" in str(info.value), str(info.value)
    client.close()
