"""The pure Shard against direct numpy computations (no gRPC)."""

import numpy as np
import pytest

from bank_server import shard as shard_module
from bank_server.errors import InvalidArgument
from bank_server.shard import Layout, Shard, initial_rows, rows_on_shard


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_rows_on_shard_cover_the_bank():
    for n in (3, 10, 11, 1000):
        for s in (1, 2, 3):
            assert sum(rows_on_shard(n, s, i) for i in range(s)) == n
            assert [rows_on_shard(n, s, i) for i in range(s)] == [len(range(i, n, s)) for i in range(s)]


def test_initial_rows_are_seeded_unit_vectors():
    layout = Layout(1, 2, 101, 16, "float32")
    a, b = initial_rows(layout, seed=3), initial_rows(layout, seed=3)
    assert a.shape == (50, 16)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, initial_rows(layout, seed=4))
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-5)


def test_layout_rejects_shard_id_outside_range():
    with pytest.raises(InvalidArgument, match="shard_id"):
        Layout(2, 2, 10, 4)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_momentum_update_matches_formula(dtype):
    layout = Layout(0, 2, 40, 8, dtype)
    shard = Shard.create(layout, seed=1)
    before = shard.lookup(np.arange(0, 40, 2)).astype(np.float32)
    g = np.array([4, 0, 38])
    f = unit(np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32))
    assert shard.momentum_update(g, f, 0.3)
    expected = unit(0.3 * before[g // 2] + 0.7 * f)
    tol = 1e-6 if dtype == "float32" else 2e-3
    np.testing.assert_allclose(shard.lookup(g).astype(np.float32), expected, atol=tol)
    untouched = np.setdiff1d(np.arange(0, 40, 2), g)
    np.testing.assert_array_equal(shard.lookup(untouched).astype(np.float32), before[untouched // 2])


def test_repeated_client_sequence_is_applied_once():
    shard = Shard.create(Layout(0, 1, 10, 4, "float32"))
    f = unit(np.ones((1, 4), np.float32))
    assert shard.momentum_update([3], f, 0.5, "client-a", 7)
    once = shard.lookup([3]).copy()
    assert not shard.momentum_update([3], f, 0.5, "client-a", 7)
    np.testing.assert_array_equal(shard.lookup([3]), once)
    assert shard.momentum_update([3], f, 0.5, "client-b", 7)
    assert shard.updates_applied == 2


def test_partition_sums_over_many_blocks_match_logsumexp(monkeypatch):
    monkeypatch.setattr(shard_module, "_SCAN_ELEMENTS", 1)  # blocks of 256 rows
    layout = Layout(0, 1, 1000, 16, "float32")
    shard = Shard.create(layout, seed=2)
    bank = shard.lookup(np.arange(1000)).astype(np.float64)
    q = unit(np.random.default_rng(1).standard_normal((5, 16)))
    m, s, w = shard.partition_sums(q.astype(np.float32), 0.07)
    logits = q @ bank.T / 0.07
    ref_m = logits.max(axis=1)
    e = np.exp(logits - ref_m[:, None])
    np.testing.assert_allclose(m, ref_m, rtol=1e-5)
    np.testing.assert_allclose(s, e.sum(1), rtol=1e-4)
    np.testing.assert_allclose(w, e @ bank, rtol=1e-4, atol=1e-5)


def test_topk_over_many_blocks_matches_sort(monkeypatch):
    monkeypatch.setattr(shard_module, "_SCAN_ELEMENTS", 1)
    layout = Layout(1, 3, 2000, 8, "float32")
    shard = Shard.create(layout, seed=5)
    globals_ = np.arange(1, 2000, 3)
    bank = shard.lookup(globals_)
    q = np.random.default_rng(3).standard_normal((4, 8)).astype(np.float32)
    sims, idx = shard.topk(q, 10)
    ref = unit(q) @ bank.T
    order = np.argsort(-ref, axis=1)[:, :10]
    np.testing.assert_array_equal(idx, globals_[order])
    np.testing.assert_allclose(sims, np.take_along_axis(ref, order, 1), rtol=1e-5)


def test_step_is_validated_whole_before_any_change():
    shard = Shard.create(Layout(0, 1, 10, 4, "float32"))
    before = shard.lookup(np.arange(10)).copy()
    f = unit(np.ones((2, 4), np.float32))
    with pytest.raises(InvalidArgument, match="lookup_indices"):
        shard.step(([1, 2], f, 0.5, "c", 1), np.array([3, 10]), 0)
    with pytest.raises(InvalidArgument, match="sample_k"):
        shard.step(([1, 2], f, 0.5, "c", 1), np.array([3]), 11)
    np.testing.assert_array_equal(shard.lookup(np.arange(10)), before)
    assert shard.updates_applied == 0


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9])
def test_the_update_is_bit_identical_to_the_formula(dtype, momentum):
    """v <- normalize(m v + (1 - m) f), computed in float32 and stored once in the bank's dtype."""
    layout = Layout(0, 1, 500, 16, dtype)
    shard = Shard.create(layout, seed=3)
    rng = np.random.default_rng(1)
    idx = rng.choice(500, 64, replace=False)
    f = rng.standard_normal((64, 16)).astype(np.float32)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    before = shard.lookup(idx).astype(np.float32)
    m = np.float32(momentum)
    mixed = before * m + f * (np.float32(1) - m)
    expected = (mixed / np.maximum(np.linalg.norm(mixed, axis=1, keepdims=True), np.float32(1e-12))).astype(dtype)
    shard.momentum_update(idx, f, momentum)
    assert shard.lookup(idx).tobytes() == expected.tobytes()


def test_the_float16_table_gives_numpys_bits_for_every_value():
    every = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    exact = every.astype(np.float32).view(np.uint32).tobytes()
    assert shard_module.as_float32(every).view(np.uint32).tobytes() == exact
    rows = np.ones((3, 4), np.float32)
    assert shard_module.as_float32(rows) is rows
