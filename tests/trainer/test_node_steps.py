"""One Step per node per shard, on real shard servers and a real gloo group: three
worker processes, two of which share a "node"."""

import numpy as np
import pytest
import torch.multiprocessing as mp

from bank_server.client import BankClient
from bank_server.errors import InvalidArgument
from bank_server.protocol import step_message_bytes
from tests.conftest import free_port, reference_bank
from tests.trainer.test_bank_feed import M, apply, unit
from trainer.node_steps import StepRequest, pack

N, D, K = 60, 8, 7
NODES = ["a", "a", "b"]  # ranks 0 and 1 share node a; rank 2 is alone on node b
ROWS = [np.arange(0, 10), np.arange(10, 20), np.arange(20, 30)]  # each worker's batch


def request(rows, negatives=0, momentum=M) -> StepRequest:
    rows = np.asarray(rows, np.int64)
    return StepRequest(rows, np.zeros((len(rows), D), np.float32), momentum, rows, negatives)


def test_requests_share_a_step_unless_rows_collide_momenta_differ_or_it_would_not_fit():
    big = 10**9
    assert pack([request([0, 1]), request([2]), request([3])], big, D, "float32", N) == [[0, 1, 2]]
    assert pack([request([0, 1]), request([1]), request([3])], big, D, "float32", N) == [[0], [1, 2]]
    assert pack([request([0]), request([1], momentum=0.9)], big, D, "float32", N) == [[0], [1]]
    one = step_message_bytes(2, 2, 5, D, "float32")
    assert pack([request([0, 1], 5), request([2, 3], 5)], one, D, "float32", N) == [[0], [1]]
    assert pack([request([0], 40), request([1], 20), request([2], 30)], big, D, "float32", N) == [[0, 1], [2]]


def worker(rank: int, port: int, addresses: list[str], answers) -> None:
    import torch.distributed as torch_dist

    from trainer import distributed as dist
    from trainer.node_steps import NodeSteps

    torch_dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=3)
    try:
        node = dist.node_group(NODES[rank])
        client = BankClient(addresses)
        step = NodeSteps(client, node).step if node is not None else client.step
        rows = ROWS[rank]
        f = unit(np.random.default_rng(rank).standard_normal((len(rows), D)).astype(np.float32))
        # 1. each worker writes its batch and reads it back, with K negatives of its own
        got = step(rows, f, M, rows, K)
        answers.put((rank, "step", node is not None, f, got.rows, got.negative_indices, got.negative_rows))
        torch_dist.barrier()
        # 2. the leader's request is bad: it alone raises, as its own Step would
        bad = np.array([N + 5]) if rank == 0 else rows
        try:
            got = step(None, None, M, bad, K)
            answers.put((rank, "bad", got.rows))
        except InvalidArgument as error:
            answers.put((rank, "bad", str(error)))
        torch_dist.barrier()
        # 3. both workers of node 0 write the same rows: two Steps, in rank order
        if rank < 2:
            g = unit(np.full((3, D), rank + 1.0, np.float32))
            step(np.arange(40, 43), g, M, None, 0)
            answers.put((rank, "collide", g))
        torch_dist.barrier()
        client.close()
    finally:
        torch_dist.destroy_process_group()


def test_each_worker_gets_what_its_own_step_would_and_its_node_sends_one(make_bank):
    bank = make_bank(2, N, D, "float32", seed=5)
    ctx = mp.get_context("spawn")
    answers = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, port, bank.addresses, answers)) for r in range(3)]
    for p in procs:
        p.start()
    got = [answers.get(timeout=120) for _ in range(3 + 3 + 2)]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    by = {(a[0], a[1]): a[2:] for a in got}

    reference = reference_bank(2, N, D, "float32", seed=5)
    untouched = reference.copy()
    for rank in range(3):
        shares_node, f, rows, neg_idx, neg_rows = by[(rank, "step")]
        assert shares_node == (rank < 2)
        apply(reference, (ROWS[rank], f))
        np.testing.assert_array_equal(rows, reference[ROWS[rank]])  # after its own update
        assert neg_idx.shape == (K,) and ((0 <= neg_idx) & (neg_idx < N)).all() and neg_rows.shape == (K, D)
        far = neg_idx >= 30  # rows nobody wrote
        np.testing.assert_array_equal(neg_rows[far], untouched[neg_idx[far]])

    np.testing.assert_array_equal(by[(1, "bad")][0], reference[ROWS[1]])
    with BankClient(bank.addresses) as client:
        with pytest.raises(InvalidArgument) as own:
            client.step(lookup_indices=np.array([N + 5]), negatives=K)
        assert by[(0, "bad")][0] == str(own.value)
        # Node 0 sent one Step per shard, rank 2 its own, then node 0 two for the collision.
        assert [d["updates_applied"] for d in client.describe()] == [4, 4]
        for rank in range(2):
            apply(reference, (np.arange(40, 43), by[(rank, "collide")][0]))
        np.testing.assert_array_equal(client.lookup(np.arange(N)), reference)
