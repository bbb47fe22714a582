"""A Restore that fails half-way leaves the shard damaged: every call answers DATA_LOSS,
health says NOT_SERVING, and neither a periodic nor the final snapshot writes its rows
or moves LATEST (the next start recovers from LATEST and the log). And a Restore turns
calls away only once it runs, not while it waits for a snapshot to end."""

import logging
import threading
import time
from dataclasses import asdict

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bank_server import snapshot as snapshots
from bank_server import update_log
from bank_server.client import BankClient
from bank_server.errors import DataLoss
from bank_server.recovery import open_logged
from bank_server.server import BankServer, ServerConfig
from bank_server.shard import Layout
from protos import bank_pb2, bank_pb2_grpc
from tests.conftest import wait_until

N, D = 40, 8
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def health(address):
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status


def call(address, method, request):
    with grpc.insecure_channel(address) as channel:
        return getattr(bank_pb2_grpc.MemoryBankStub(channel), method)(request, timeout=30)


def plant_snapshot_that_fails_mid_load(directory, layout: Layout, tag="bad"):
    """A snapshot whose file checks pass (every batch's crc32, its log segment's header
    and record checksums) but whose load fails half-way: its log segment's one record,
    checksummed, writes a row the shard does not have. Its rows differ from the live ones,
    so a half-done load is visible."""
    folder = snapshots.shard_dir(directory, layout.shard_id)
    log = update_log.UpdateLog(folder, layout, "no")
    log.append(np.array([layout.rows_held + 3]), np.zeros((1, layout.dim), np.float16), "planted", 1)
    segment = log.segment
    log.close()
    rows = np.full((layout.rows_held, layout.dim), layout.dim**-0.5, np.float16)
    metadata = snapshots.metadata(asdict(layout), tag, segment)
    snapshots.write(directory, layout.shard_id, tag, metadata, layout.dim, np.float16, [(rows, 1)])
    return rows


@pytest.fixture
def server(tmp_path):
    config = ServerConfig(
        shard_id=0, num_shards=1, rows=N, dim=D, port=0, snapshot_dir=str(tmp_path), fsync="always", snapshot_every=0.05
    )
    server = BankServer(config).start()
    server.load()
    yield server
    server.stop(grace=0, final_snapshot=False)


def test_a_restore_that_fails_half_way_damages_the_shard_and_nothing_snapshots_it(server, tmp_path, caplog):
    layout = server.config.layout
    with BankClient([server.address]) as client:
        client.update(np.arange(4), np.full((4, D), D**-0.5, np.float32), 0.5)
        client.snapshot("epoch-1")
    with server.servicer.shard._snapshot_lock:  # no periodic snapshot prunes its segment meanwhile
        planted = plant_snapshot_that_fails_mid_load(tmp_path, layout)
    latest = snapshots.latest_path(tmp_path, 0)
    with caplog.at_level(logging.ERROR, logger="bank_server.server"):
        with pytest.raises(grpc.RpcError) as failed:
            call(server.address, "Restore", bank_pb2.RestoreRequest(tag="bad"))
        assert failed.value.code() == grpc.StatusCode.DATA_LOSS
        assert "failed half-way" in failed.value.details() and "outside this shard" in failed.value.details()
        assert server.servicer.shard.damaged
        np.testing.assert_array_equal(server.servicer.shard._rows[:2], planted[:2])  # half-loaded rows
        before = latest.read_bytes()
        arrows = sorted(p.name for p in snapshots.shard_dir(tmp_path, 0).glob("*.arrow"))
        assert health(server.address) == NOT_SERVING
        with pytest.raises(grpc.RpcError) as refused:
            call(server.address, "Describe", bank_pb2.DescribeRequest())
        assert refused.value.code() == grpc.StatusCode.DATA_LOSS
        with pytest.raises(DataLoss, match="damaged"):
            server.servicer.shard.snapshot(tmp_path, "by-hand")

        def errors(word):
            return [r for r in caplog.records if r.levelno == logging.ERROR and word in r.getMessage()]

        assert wait_until(lambda: errors("periodic"), timeout=30)  # a periodic snapshot came, and was skipped
        server.stop(grace=0, final_snapshot=True)  # as SIGTERM or the Ray actor's stop(final_snapshot=True)
        assert errors("final")  # said, not silently left out
    assert latest.read_bytes() == before
    assert sorted(p.name for p in snapshots.shard_dir(tmp_path, 0).glob("*.arrow")) == arrows
    # The next start recovers the state LATEST and the log hold: the update and the snapshots before it.
    pointer = snapshots.read_latest(tmp_path, 0)
    assert pointer["tag"] != "bad"
    shard, recovery = open_logged(layout, tmp_path, seed=0)
    try:
        assert not shard.damaged and shard.updates_applied == 1
        assert not np.array_equal(shard.lookup(np.arange(N)), np.full((N, D), D**-0.5, np.float16))
    finally:
        shard.log.close()


def test_a_restore_of_a_missing_tag_changes_nothing_and_health_stays_serving(server):
    with pytest.raises(grpc.RpcError) as failed:
        call(server.address, "Restore", bank_pb2.RestoreRequest(tag="nothing-here"))
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND
    assert health(server.address) == SERVING and not server.servicer.shard.damaged
    call(server.address, "Describe", bank_pb2.DescribeRequest())


def test_a_restore_waiting_for_a_snapshot_does_not_turn_calls_away(server):
    with BankClient([server.address]) as client:
        client.snapshot("epoch-1")
    shard = server.servicer.shard
    answers = []
    with shard._snapshot_lock:  # as a snapshot being written holds it
        restore = threading.Thread(
            target=lambda: answers.append(call(server.address, "Restore", bank_pb2.RestoreRequest(tag="epoch-1")))
        )
        restore.start()
        time.sleep(0.5)  # the Restore has arrived and waits (were it not there yet, nothing below could fail)
        assert restore.is_alive()
        assert health(server.address) == SERVING
        call(server.address, "Describe", bank_pb2.DescribeRequest())  # answered, not UNAVAILABLE
    restore.join(60)
    assert answers and answers[0].tag == "epoch-1"
    assert health(server.address) == SERVING


def test_a_restore_whose_latest_cannot_be_written_damages_the_shard_and_the_old_timeline_recovers(tmp_path):
    # The rows load and the new generation starts, then LATEST cannot be written (here a
    # directory stands where its temporary file goes): the shard would serve restored rows
    # while LATEST names the old timeline, so it is damaged instead.
    import os

    layout = Layout(0, 1, N, D, "float16")
    shard, _ = open_logged(layout, tmp_path, seed=0, fsync="always")
    shard.momentum_update(np.arange(4), np.full((4, D), D**-0.5, np.float32), 0.5, "c", 1)
    shard.snapshot(tmp_path, "epoch-1")
    shard.momentum_update(np.arange(4, 8), np.full((4, D), D**-0.5, np.float32), 0.5, "c", 2)
    live = shard.lookup(np.arange(N)).copy()
    latest = snapshots.latest_path(tmp_path, 0)
    before = latest.read_bytes()
    blocker = latest.parent / f".LATEST.tmp-{os.getpid()}"
    blocker.mkdir()
    with pytest.raises(DataLoss, match="failed half-way"):
        shard.restore_in_place(tmp_path, "epoch-1")
    assert shard.damaged and latest.read_bytes() == before
    with pytest.raises(DataLoss, match="damaged"):
        shard.snapshot(tmp_path, "after")
    shard.log.close()
    blocker.rmdir()
    again, recovery = open_logged(layout, tmp_path, seed=0)
    try:
        np.testing.assert_array_equal(again.lookup(np.arange(N)), live)  # the timeline LATEST names, both updates
        assert again.updates_applied == 2
    finally:
        again.log.close()
