"""Prometheus metrics of real shard servers (two in this process, each its own registry)."""

import re
import threading
import urllib.request

import grpc
import numpy as np
import pytest

from bank_server import tensors
from bank_server.client import BankClient
from bank_server.server import BankServer, ServerConfig
from protos import bank_pb2, bank_pb2_grpc
from tests.conftest import free_port, wait_until

N, D = 40, 8


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        return answer.read().decode()


def value(text: str, name: str, **labels) -> float:
    selector = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))  # as prometheus-client orders them
    pattern = rf"^{name}{{{selector}}} (\S+)$" if labels else rf"^{name} (\S+)$"
    found = re.search(pattern, text, flags=re.M)
    assert found, f"{name} {labels} not in:\n{text}"
    return float(found.group(1))


def test_each_server_counts_its_calls_errors_rows_log_and_snapshots(tmp_path):
    servers = [
        BankServer(
            ServerConfig(
                shard_id=s,
                num_shards=2,
                rows=N,
                dim=D,
                port=0,
                snapshot_dir=str(tmp_path),
                metrics_port=free_port(),
                fsync="always",
            )
        ).start()
        for s in range(2)
    ]
    try:
        for server in servers:
            server.load()
        with BankClient([s.address for s in servers]) as client:
            f = np.full((4, D), D**-0.5, np.float32)
            client.update(np.array([0, 2, 4, 6]), f, 0.5)  # shard 0 only
            client.step(np.array([8, 10]), f[:2], 0.5, np.array([1, 3]), 4)
            client.snapshot("epoch-1")
        with grpc.insecure_channel(servers[0].address) as channel:  # row 1 is shard 1's
            with pytest.raises(grpc.RpcError):
                bank_pb2_grpc.MemoryBankStub(channel).Lookup(
                    bank_pb2.LookupRequest(indices=tensors.encode(np.array([1]))), timeout=10
                )
        first, second = scrape(servers[0].metrics_port), scrape(servers[1].metrics_port)
        assert value(first, "instdisc_bank_calls_total", method="Update") == 1
        assert value(second, "instdisc_bank_calls_total", method="Step") == 1
        assert value(first, "instdisc_bank_errors_total", code="INVALID_ARGUMENT", method="Lookup") == 1
        assert value(first, "instdisc_bank_call_seconds_count", method="Step") == 1
        assert value(first, "instdisc_bank_rows_held") == N // 2
        assert value(first, "instdisc_bank_updates_applied") == 2  # a gauge: a Restore sets it back
        assert value(second, "instdisc_bank_updates_applied") == 0
        assert "# TYPE instdisc_bank_updates_applied gauge" in first
        assert value(first, "instdisc_bank_log_bytes_total") > 6 * D * 2
        assert value(first, "instdisc_bank_fsync_lag_seconds") == 0  # fsync=always: nothing waits
        assert 0 <= value(first, "instdisc_bank_snapshot_age_seconds") < 60
        assert value(first, "instdisc_bank_snapshot_duration_seconds") >= 0
    finally:
        for server in servers:
            server.stop(grace=0, final_snapshot=False)


def test_concurrent_always_calls_share_fsyncs(tmp_path):
    # Group commit: with --fsync always every caller waits for an fsync covering its
    # record, and one fsync covers every record written before it. Made deterministic by
    # holding the log's sync lock (as a running fsync does) until every writer has
    # appended its record and waits: then exactly one fsync serves them all.
    writers = 8
    server = BankServer(
        ServerConfig(
            shard_id=0,
            num_shards=1,
            rows=400,
            dim=D,
            port=0,
            snapshot_dir=str(tmp_path),
            metrics_port=free_port(),
            fsync="always",
            workers=writers,
        )
    ).start()
    try:
        shard = server.load()
        before = value(scrape(server.metrics_port), "instdisc_bank_log_fsyncs_total")
        written = shard.log.written
        failures = []

        def write(w):
            try:
                with BankClient([server.address]) as client:
                    client.update(np.arange(4) + 4 * w, np.full((4, D), D**-0.5, np.float32), 0.5)
            except Exception as error:  # reported below
                failures.append(error)

        threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
        with shard.log._sync_lock:
            for thread in threads:
                thread.start()
            assert wait_until(lambda: shard.log.written == written + writers, timeout=60), shard.log.written
            assert all(t.is_alive() for t in threads)  # none answered: each waits for its fsync
        for thread in threads:
            thread.join(60)
        assert not any(t.is_alive() for t in threads) and not failures, failures
        text = scrape(server.metrics_port)
        assert value(text, "instdisc_bank_updates_applied") == writers
        assert value(text, "instdisc_bank_log_fsyncs_total") - before == 1
    finally:
        server.stop(grace=0, final_snapshot=False)
