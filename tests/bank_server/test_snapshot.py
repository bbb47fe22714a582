"""Snapshots: round trip, restore (snapshot + log) after SIGKILL, final snapshot at SIGTERM, layout checks."""

import signal

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bank_server.client import BankClient
from bank_server.errors import FailedPrecondition
from bank_server.shard import Layout, Shard
from protos import bank_pb2, bank_pb2_grpc

N, D = 50, 8


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip_keeps_rows_counters_and_retry_memory(tmp_path, dtype):
    layout = Layout(1, 2, N, D, dtype)
    shard = Shard.create(layout, seed=9)
    f = unit(np.ones((2, D), np.float32))
    shard.momentum_update([1, 3], f, 0.5, "client", 1)
    path, nbytes, seconds = shard.snapshot(tmp_path, "epoch-1")
    assert path.exists() and nbytes > 25 * D and seconds >= 0
    assert not [p for p in path.parent.iterdir() if "tmp" in p.name]
    restored = Shard.restore(layout, tmp_path)
    np.testing.assert_array_equal(restored.lookup(np.arange(1, N, 2)), shard.lookup(np.arange(1, N, 2)))
    assert restored.updates_applied == 1 and restored.last_snapshot_tag == "epoch-1"
    assert not restored.momentum_update([1, 3], f, 0.5, "client", 1)  # the retry is still recognised


def test_only_the_newest_snapshots_are_kept(tmp_path):
    shard = Shard.create(Layout(0, 1, N, D))
    for tag in ("a", "b", "c", "d"):
        shard.snapshot(tmp_path, tag, keep=2)
    assert sorted(p.stem for p in (tmp_path / "shard-00000").glob("*.arrow")) == ["c", "d"]
    assert Shard.restore(Layout(0, 1, N, D), tmp_path).last_snapshot_tag == "d"


def test_restore_refuses_another_layout(tmp_path):
    Shard.create(Layout(0, 2, N, D)).snapshot(tmp_path, "a")
    with pytest.raises(FailedPrecondition, match="total_rows: snapshot 50 vs server 52"):
        Shard.restore(Layout(0, 2, N + 2, D), tmp_path)


def serve_args(tmp_path, *extra):
    return (
        "--shard-id",
        "0",
        "--num-shards",
        "1",
        "--rows",
        str(N),
        "--dim",
        str(D),
        "--port",
        "0",
        "--snapshot-dir",
        str(tmp_path),
        *extra,
    )


def health_status(address):
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status


def test_killed_server_restarts_from_its_snapshot_and_log(tmp_path, spawn_server):
    server = spawn_server(*serve_args(tmp_path))
    server.wait_serving()
    assert health_status(server.address) == health_pb2.HealthCheckResponse.SERVING
    with BankClient([server.address]) as client:
        client.update(np.arange(10), unit(np.ones((10, D), np.float32)), 0.0)
        saved = client.lookup(np.arange(N)).copy()
        client.snapshot("step-10")
        client.update(np.arange(10), unit(-np.ones((10, D), np.float32)), 0.0)  # after it: in the update log
        saved = client.lookup(np.arange(N)).copy()
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait()
    again = spawn_server(*serve_args(tmp_path))
    with BankClient([again.address]) as client:  # retries UNAVAILABLE while it loads
        np.testing.assert_array_equal(client.lookup(np.arange(N)), saved)
        assert client.describe()[0]["last_snapshot_tag"] == "step-10"


def test_sigterm_drains_snapshots_and_exits_zero(tmp_path, spawn_server):
    server = spawn_server(*serve_args(tmp_path))
    server.wait_serving()
    with BankClient([server.address]) as client:
        client.update(np.arange(5), unit(np.ones((5, D), np.float32)), 0.0)
        state = client.lookup(np.arange(N)).copy()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0
    again = spawn_server(*serve_args(tmp_path))
    with BankClient([again.address]) as client:
        np.testing.assert_array_equal(client.lookup(np.arange(N)), state)
        assert client.describe()[0]["last_snapshot_tag"].startswith("shutdown-")


def test_restore_rpc_rolls_back_to_a_tag(make_bank, tmp_path):
    bank = make_bank(2, N, D, "float32", snapshot_dir=str(tmp_path))
    client = bank.client()
    original = client.lookup(np.arange(N)).copy()
    client.snapshot("start")
    client.update(np.arange(N), unit(np.ones((N, D), np.float32)), 0.0)
    client.snapshot("later")
    assert [r["tag"] for r in client.restore("start")] == ["start", "start"]
    np.testing.assert_array_equal(client.lookup(np.arange(N)), original)
    client.close()


def test_server_with_other_layout_snapshot_refuses_to_start(tmp_path, spawn_server):
    Shard.create(Layout(0, 1, N + 1, D)).snapshot(tmp_path, "old")
    server = spawn_server(*serve_args(tmp_path))
    assert server.proc.wait(30) == 2
    assert "another layout" in server.proc.stderr.read()


def test_shard_id_outside_range_refuses_to_start(tmp_path):
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "bank_server", "--shard-id", "3", "--num-shards", "3", "--rows", "10", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "shard_id must be in [0, 3)" in done.stderr


def test_health_is_not_serving_until_loaded(make_bank):
    from bank_server.server import BankServer, ServerConfig

    server = BankServer(ServerConfig(shard_id=0, num_shards=1, rows=N, dim=D, port=0)).start()
    try:
        assert health_status(server.address) == health_pb2.HealthCheckResponse.NOT_SERVING
        with grpc.insecure_channel(server.address) as channel:
            with pytest.raises(grpc.RpcError) as info:
                bank_pb2_grpc.MemoryBankStub(channel).Describe(bank_pb2.DescribeRequest())
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        server.load()
        assert health_status(server.address) == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop(grace=0, final_snapshot=False)


def test_periodic_snapshots_run_in_the_background(tmp_path):
    from bank_server import snapshot as snapshots
    from bank_server.server import BankServer, ServerConfig
    from tests.conftest import wait_until

    server = BankServer(
        ServerConfig(shard_id=0, num_shards=1, rows=N, dim=D, port=0, snapshot_dir=str(tmp_path), snapshot_every=0.3)
    ).start()
    try:
        server.load()
        with BankClient([server.address]) as client:
            client.update(np.arange(5), unit(np.ones((5, D), np.float32)), 0.0)
            assert wait_until(lambda: (snapshots.latest_tag(tmp_path, 0) or "").startswith("periodic-"), timeout=20)
    finally:
        server.stop(grace=0, final_snapshot=False)
    assert Shard.restore(Layout(0, 1, N, D), tmp_path).last_snapshot_tag.startswith("periodic-")
