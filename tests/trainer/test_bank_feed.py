"""BankFeed's schedule on real shard servers: which rows a step reads and when its
update lands, checked against a numpy replay of the stated order."""

import logging

import numpy as np
import pytest
import torch

from tests.conftest import reference_bank
from trainer.bank_feed import BankFeed

N, D, B, K, M = 48, 8, 6, 5, 0.5


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def apply(bank: np.ndarray, update) -> None:
    """The shard's momentum update, in the same float32 arithmetic."""
    idx, f = update
    mixed = bank[idx].astype(np.float32) * np.float32(M) + f.astype(np.float32) * (np.float32(1) - np.float32(M))
    bank[idx] = unit(mixed)


def batches(rng, count):
    """`count` batches of distinct rows within each pass over the bank, as an epoch's
    sampler gives them; over two passes, rows repeat across the boundary."""
    order = np.concatenate([rng.permutation(N), rng.permutation(N)])
    return [
        (
            torch.zeros(B, 1, 2, 2, dtype=torch.uint8),
            torch.from_numpy(order[i * B : (i + 1) * B]),
            torch.zeros(B, dtype=torch.long),
        )
        for i in range(count)
    ]


def test_step_t_reads_rows_after_update_t_minus_2_and_every_update_lands_once(make_bank):
    bank = make_bank(2, N, D, "float32", seed=3)
    client = bank.client()
    feed = BankFeed(client, K, M, torch.device("cpu"))
    rng = np.random.default_rng(0)
    reference = reference_bank(2, N, D, "float32", seed=3)
    updates = []
    plan = batches(rng, 12)  # 8 batches to an epoch: steps 8-11 are the second pass
    for t, step in enumerate(feed.steps(plan)):
        # Applied before this step's rows were read: every update but the previous step's.
        if t >= 2:
            apply(reference, updates[t - 2])
        idx = step.indices.numpy()
        np.testing.assert_array_equal(step.positives.numpy(), reference[idx])
        assert step.negatives.shape == (K, D) and step.positives.dtype == torch.float32
        f = unit(rng.standard_normal((B, D)).astype(np.float32))
        updates.append((idx, f))
        feed.push(step.indices, torch.from_numpy(f))
    feed.close()
    for update in updates[-2:]:  # the last two land after the last step's read
        apply(reference, update)
    np.testing.assert_array_equal(client.lookup(np.arange(N)), reference)
    assert sum(d["updates_applied"] for d in client.describe()) == 2 * len(plan)  # one per shard per step
    client.close()


def test_a_step_without_push_is_refused(make_bank):
    bank = make_bank(1, N, D, "float32")
    client = bank.client()
    feed = BankFeed(client, K, M, torch.device("cpu"))
    steps = feed.steps(batches(np.random.default_rng(1), 3))
    next(steps)
    with pytest.raises(RuntimeError, match="push"):
        next(steps)
    feed.close()
    client.close()


def test_an_update_dropped_by_an_early_stop_is_logged(make_bank, caplog):
    bank = make_bank(1, N, D, "float32")
    client = bank.client()
    feed = BankFeed(client, K, M, torch.device("cpu"))
    for step in feed.steps(batches(np.random.default_rng(2), 3)):
        feed.push(step.indices, torch.from_numpy(unit(np.ones((B, D), np.float32))))
        break  # a stop on every worker
    with caplog.at_level(logging.WARNING, logger="trainer.bank_feed"):
        feed.close()
    assert [r.levelname for r in caplog.records] == ["WARNING"] and "dropped" in caplog.text
    client.close()


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_rows_reach_torch_as_float32_from_any_answer(dtype):
    """A one-shard answer is a read-only view of the received bytes, at any offset."""
    from trainer.bank_feed import rows_on

    rows = np.arange(12, dtype=dtype).reshape(3, 4)
    received = bytes(3) + rows.tobytes()
    view = np.frombuffer(received, dtype, offset=3).reshape(3, 4)
    assert not view.flags.writeable and not view.flags.aligned
    for answer in (view, rows.copy()):
        out = rows_on(answer, torch.device("cpu"))
        assert out.dtype == torch.float32 and out.tolist() == rows.astype(np.float32).tolist()
