"""Fault injection on real shard processes (``python -m bank_server``, as `instdisc bank
serve` runs it): SIGKILL mid-stream, mid-snapshot and right after a Restore, then a
restart with the same command must give back every acknowledged update exactly; damaged
stored state must be refused by name. Each test kills only processes it started."""

import threading
import time

import grpc
import numpy as np
import pytest

from bank_server import snapshot as snapshots
from bank_server import tensors, update_log
from bank_server.shard import Layout, Shard
from protos import bank_pb2, bank_pb2_grpc
from tests.processes import ChildFailed, ServerProcess

N, D, DTYPE = 200, 16, "float16"
MOMENTUM = 0.5


def serve_args(directory, rows=N, dim=D, *extra):
    return [
        "-m",
        "bank_server",
        "--shard-id",
        "0",
        "--num-shards",
        "1",
        "--rows",
        str(rows),
        "--dim",
        str(dim),
        "--dtype",
        DTYPE,
        "--port",
        "0",
        "--snapshot-dir",
        str(directory),
        "--fsync",
        "always",
        *extra,
    ]


class Updates:
    """A client that numbers its updates itself and remembers which were acknowledged,
    and a numpy model (a pure Shard) that applies exactly those, in order."""

    def __init__(self, rows=N, dim=D, seed=0):
        self.rows, self.dim = rows, dim
        self.model = Shard.create(Layout(0, 1, rows, dim, DTYPE), seed=0)
        self.rng = np.random.default_rng(seed)
        self.sequence = 0
        self.touched = set()
        self.unacknowledged = None

    def next(self):
        self.sequence += 1
        idx = self.rng.choice(self.rows, 8, replace=False)
        f = self.rng.standard_normal((8, self.dim)).astype(np.float32)
        return idx, f / np.linalg.norm(f, axis=1, keepdims=True), self.sequence

    def send(self, stub, update) -> bool:
        idx, f, sequence = update
        request = bank_pb2.UpdateRequest(
            indices=tensors.encode(idx),
            features=tensors.encode(f),
            momentum=MOMENTUM,
            client_id="fault-test",
            sequence=sequence,
        )
        answer = stub.Update(request, timeout=10)
        self.acknowledge(update)
        return answer.applied

    def send_many(self, stub, count: int) -> None:
        for _ in range(count):
            self.send(stub, self.next())

    def acknowledge(self, update):
        idx, f, sequence = update
        self.model.momentum_update(idx, f, MOMENTUM, "fault-test", sequence)
        self.touched.update(int(i) for i in idx)

    def stream(self, stub, stop: threading.Event):
        """Update until the server dies (or `stop`); the call in flight then is the
        unacknowledged one."""
        while not stop.is_set():
            update = self.next()
            try:
                self.send(stub, update)
            except grpc.RpcError:
                self.unacknowledged = update
                return

    def check(self, stub, indices=None):
        indices = np.arange(self.rows) if indices is None else np.asarray(indices)
        for part in np.array_split(indices, max(1, len(indices) // 4096)):
            got = tensors.decode(
                stub.Lookup(bank_pb2.LookupRequest(indices=tensors.encode(part)), timeout=30).rows, "rows"
            )
            np.testing.assert_array_equal(got, self.model.lookup(part))


def start(args, tmp_path, name) -> ServerProcess:
    server = ServerProcess(args, stderr=tmp_path / f"{name}.log")
    server.wait_serving(120)
    return server


def kill(server: ServerProcess) -> None:
    server.proc.kill()  # SIGKILL, of the process this test started
    server.proc.wait()
    server.stop()


def channel_to(server):
    return grpc.insecure_channel(server.address)


def test_sigkill_mid_stream_loses_no_acknowledged_update_and_the_retry_applies_once(tmp_path):
    args = serve_args(tmp_path)
    updates = Updates()
    server = start(args, tmp_path, "first")
    try:
        with channel_to(server) as channel:
            stop = threading.Event()
            writer = threading.Thread(target=updates.stream, args=(bank_pb2_grpc.MemoryBankStub(channel), stop))
            writer.start()
            deadline = time.monotonic() + 60
            while updates.sequence < 40 and time.monotonic() < deadline:
                time.sleep(0.01)
            kill(server)
            writer.join(30)
            assert updates.unacknowledged is not None and updates.sequence >= 40
    finally:
        kill(server)
    again = start(args, tmp_path, "second")
    try:
        with channel_to(again) as channel:
            stub = bank_pb2_grpc.MemoryBankStub(channel)
            # Every acknowledged row, bit for bit (the rows of the update in flight at the
            # kill may hold it or not: it may have been logged without its answer arriving).
            updates.check(stub, np.setdiff1d(np.arange(N), updates.unacknowledged[0]))
            # The retry of the update in flight at the kill: applied once, whether or not
            # the dead server had logged it.
            updates.send(stub, updates.unacknowledged)
            updates.check(stub)
            assert not updates.send(stub, updates.unacknowledged)  # and not again
            updates.check(stub)
    finally:
        kill(again)


def test_sigkill_during_a_snapshot_write_recovers_from_the_previous_snapshot_and_the_log(tmp_path):
    rows, dim = 1_000_000, 32  # 64 MB of float16: a snapshot write long enough to be caught
    args = serve_args(tmp_path, rows, dim)
    updates = Updates(rows, dim)
    folder = snapshots.shard_dir(tmp_path, 0)
    caught = False
    for attempt in range(3):  # real timing: a snapshot that finished first is tried again
        server = start(args, tmp_path, f"run-{attempt}")
        try:
            with channel_to(server) as channel:
                stub = bank_pb2_grpc.MemoryBankStub(channel)
                updates.send_many(stub, 5)
                if attempt == 0:
                    stub.Snapshot(bank_pb2.SnapshotRequest(tag="before"), timeout=120)
                stop = threading.Event()
                writer = threading.Thread(target=updates.stream, args=(stub, stop))
                writer.start()
                snapshot = stub.Snapshot.future(bank_pb2.SnapshotRequest(tag=f"killed-{attempt}"), timeout=120)
                deadline = time.monotonic() + 60
                while not snapshot.done() and time.monotonic() < deadline:
                    if any(folder.glob(f".killed-{attempt}.arrow.tmp-*")):
                        kill(server)
                        caught = True
                        break
                    time.sleep(0.002)
                stop.set()
                writer.join(30)
        finally:
            kill(server)
        if updates.unacknowledged is not None:  # in flight at the kill: acknowledged by its retry below
            update, updates.unacknowledged = updates.unacknowledged, None
        else:
            update = None
        again = start(args, tmp_path, f"recovered-{attempt}")
        try:
            with channel_to(again) as channel:
                stub = bank_pb2_grpc.MemoryBankStub(channel)
                if update is not None:
                    updates.send(stub, update)
                touched = np.array(sorted(updates.touched))
                untouched = np.random.default_rng(attempt).choice(rows, 2000, replace=False)
                updates.check(stub, np.union1d(touched, untouched))
        finally:
            kill(again)
        if caught:
            assert not (folder / f"killed-{attempt}.arrow").exists()
            assert not list(folder.glob(".*.tmp-*"))  # the half-written file was removed at the restart
            break
    assert caught, "no snapshot write was caught in flight in 3 tries"


def test_sigkill_right_after_a_restore_recovers_the_restored_timeline(tmp_path):
    args = serve_args(tmp_path)
    updates = Updates()
    server = start(args, tmp_path, "first")
    try:
        with channel_to(server) as channel:
            stub = bank_pb2_grpc.MemoryBankStub(channel)
            updates.send_many(stub, 5)
            stub.Snapshot(bank_pb2.SnapshotRequest(tag="epoch-1"), timeout=30)
            abandoned = Updates(seed=1)  # a timeline the Restore abandons: the model never sees it
            abandoned.sequence = 1000
            abandoned.send_many(stub, 5)
            stub.Restore(bank_pb2.RestoreRequest(tag="epoch-1"), timeout=30)
            updates.check(stub)
            updates.send_many(stub, 3)
    finally:
        kill(server)
    again = start(args, tmp_path, "second")
    try:
        with channel_to(again) as channel:
            updates.check(bank_pb2_grpc.MemoryBankStub(channel))
    finally:
        kill(again)


def _damage_latest(folder):
    path = folder / "LATEST"
    path.write_text("{not json")
    return path


def _damage_snapshot(folder):
    path = folder / "epoch-1.arrow"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def _damage_log_middle(folder):
    path = update_log.segment_path(folder, update_log.segment_numbers(folder)[-1])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("damage", [_damage_latest, _damage_snapshot, _damage_log_middle])
def test_damaged_state_is_refused_by_name_unless_allow_fresh(tmp_path, damage):
    args = serve_args(tmp_path)
    updates = Updates()
    server = start(args, tmp_path, "first")
    try:
        with channel_to(server) as channel:
            stub = bank_pb2_grpc.MemoryBankStub(channel)
            stub.Snapshot(bank_pb2.SnapshotRequest(tag="epoch-1"), timeout=30)
            updates.send_many(stub, 6)
    finally:
        kill(server)
    damaged = damage(snapshots.shard_dir(tmp_path, 0))
    with pytest.raises(ChildFailed) as failed:
        ServerProcess(args, stderr=tmp_path / "refused.log").wait_serving(60)
    message = (tmp_path / "refused.log").read_text()
    assert "exit status 2" in str(failed.value)
    assert str(damaged) in message and "refusing to serve" in message and "--allow-fresh" in message
    fresh = start([*args, "--allow-fresh"], tmp_path, "fresh")
    try:
        assert "--allow-fresh" in (tmp_path / "fresh.log").read_text()
        with channel_to(fresh) as channel:
            Updates().check(bank_pb2_grpc.MemoryBankStub(channel))  # the seeded rows
    finally:
        kill(fresh)


def test_a_torn_tail_is_dropped_and_logged(tmp_path):
    args = serve_args(tmp_path)
    updates = Updates()
    server = start(args, tmp_path, "first")
    try:
        with channel_to(server) as channel:
            stub = bank_pb2_grpc.MemoryBankStub(channel)
            updates.send_many(stub, 4)
    finally:
        kill(server)
    folder = snapshots.shard_dir(tmp_path, 0)
    path = update_log.segment_path(folder, update_log.segment_numbers(folder)[-1])
    size = path.stat().st_size
    with open(path, "ab") as fh:  # a crash part-way through a fifth record's write
        fh.write(b"\x40\x00\x00\x00\x12\x34")
    again = start(args, tmp_path, "second")
    try:
        assert "torn" in (tmp_path / "second.log").read_text()
        with channel_to(again) as channel:
            stub = bank_pb2_grpc.MemoryBankStub(channel)
            updates.check(stub)
            assert stub.Describe(bank_pb2.DescribeRequest(), timeout=10).updates_applied == 4
        assert path.stat().st_size == size  # the torn bytes cut off
    finally:
        kill(again)


def test_restore_turns_calls_away_and_health_not_serving_while_it_reads(tmp_path):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    rows, dim = 1_000_000, 32  # a Restore long enough to be seen
    args = serve_args(tmp_path, rows, dim)
    server = start(args, tmp_path, "first")
    try:
        with channel_to(server) as channel:
            stub = bank_pb2_grpc.MemoryBankStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            stub.Snapshot(bank_pb2.SnapshotRequest(tag="epoch-1"), timeout=120)
            seen = set()
            for _ in range(3):  # real timing: a Restore that finished unseen is tried again
                restore = stub.Restore.future(bank_pb2.RestoreRequest(tag="epoch-1"), timeout=120)
                while not restore.done():
                    status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
                    seen.add(status)
                    if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                        try:  # answered only if the Restore has ended meanwhile
                            stub.Describe(bank_pb2.DescribeRequest(), timeout=10)
                        except grpc.RpcError as turned_away:
                            assert turned_away.code() == grpc.StatusCode.UNAVAILABLE
                            seen.add("unavailable")
                restore.result()
                if {health_pb2.HealthCheckResponse.NOT_SERVING, "unavailable"} <= seen:
                    break
            assert health_pb2.HealthCheckResponse.NOT_SERVING in seen and "unavailable" in seen
            status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
    finally:
        kill(server)
