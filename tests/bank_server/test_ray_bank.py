"""The bank as Ray actors on a real local Ray (num_cpus=2), one Ray for the module."""

import os
import signal
import socket

import numpy as np
import pytest
import ray

from bank_server.ray_bank import start_bank
from tests.conftest import wait_until


@pytest.fixture(scope="module")
def local_ray():
    # A private Ray: a bare ray.init() would join whatever a stale cluster file names.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _kill_shard(handle, shard: int) -> int:
    """SIGKILL the shard's actor process (one this test started); Ray restarts it."""
    pid = ray.get(handle.actors[shard].pid.remote())
    os.kill(pid, signal.SIGKILL)
    return pid


def _bind(sock: socket.socket, host: str, port: int) -> bool:
    try:
        sock.bind((host, port))
        return True
    except OSError:
        return False


def test_actor_shards_serve_and_restore_after_a_crash(local_ray, tmp_path):
    handle = start_bank(2, 100, 8, "float32", snapshot_dir=str(tmp_path), name="test-bank")
    try:
        assert ray.get_actor("test-bank-1") is not None
        client = handle.client(timeout=20)  # within the waits below
        f = np.full((10, 8), 8 ** -0.5, np.float32)
        client.update(np.arange(10), f, 0.0)
        saved = client.lookup(np.arange(100)).copy()
        client.snapshot("checkpoint")
        client.update(np.arange(10), -f, 0.0)  # after the snapshot: in the update log
        saved = client.lookup(np.arange(100)).copy()
        _kill_shard(handle, 0)
        # Calls meanwhile retry UNAVAILABLE, asking the named actor where it serves,
        # until the restarted actor has recovered its snapshot and log.
        assert wait_until(lambda: np.array_equal(client.lookup(np.arange(0, 100, 2)), saved[0::2]), timeout=60)
        after = client.lookup(np.arange(100))
        np.testing.assert_allclose(after[:10], -f, atol=1e-6)  # shard 0 from its log, shard 1 never crashed
        assert client.describe()[0]["last_snapshot_tag"] == "checkpoint"
        client.close()
    finally:
        handle.stop()


def test_a_restarted_shard_whose_old_port_is_taken_serves_elsewhere_and_is_found(local_ray, tmp_path):
    handle = start_bank(2, 64, 4, "float32", snapshot_dir=str(tmp_path), name="moving-bank")
    squatter = None
    try:
        client = handle.client(timeout=20)  # within the waits below
        old_address = client.addresses[1]
        client.snapshot("before")
        before = client.lookup(np.arange(64)).copy()
        _kill_shard(handle, 1)
        # Someone else binds the port the dead shard had (free once the kernel has closed
        # its sockets), before or while Ray restarts it.
        host, port = old_address.rsplit(":", 1)
        squatter = socket.socket()
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past the old connections' TIME_WAIT
        assert wait_until(lambda: _bind(squatter, host, int(port)), timeout=30)
        np.testing.assert_array_equal(client.lookup(np.arange(64)), before)
        assert client.addresses[1] != old_address
        assert client.addresses[1] == ray.get(handle.actors[1].address.remote())
        client.close()
    finally:
        if squatter is not None:
            squatter.close()
        handle.stop()


def test_a_shard_that_cannot_read_its_state_fails_the_start_with_the_reason(local_ray, tmp_path):
    from bank_server.ray_bank import BankDidNotStart

    folder = tmp_path / "shard-00001"
    folder.mkdir()
    (folder / "LATEST").write_text("{garbage")
    # Not restarted over and over: the refusal ends the start, naming the file.
    with pytest.raises(BankDidNotStart, match=r"shard-00001/LATEST is unreadable.*refusing to serve"):
        start_bank(2, 100, 8, "float32", snapshot_dir=str(tmp_path), name="refusing-bank", timeout=90)
