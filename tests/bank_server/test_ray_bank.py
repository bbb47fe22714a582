"""The bank as Ray actors on a real local Ray (num_cpus=2), one Ray for the module."""

import os
import signal
import socket
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest
import ray

from bank_server.client import BankClient, BankRpcError
from bank_server.ray_bank import BankTokenMissing, start_bank
from tests.conftest import wait_until

# Set before Ray starts, so its processes inherit it, as a Ray pod's env from a Secret.
TOKEN_ENV, ENV_TOKEN = "INSTDISC_TEST_BANK_TOKEN", "env-token-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def local_ray():
    # A private Ray: a bare ray.init() would join whatever a stale cluster file names.
    os.environ[TOKEN_ENV] = ENV_TOKEN
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
    os.environ.pop(TOKEN_ENV, None)


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
    handle = start_bank(2, 100, 8, "float32", snapshot_dir=str(tmp_path), name="test-bank", max_message_bytes=32 << 20)
    try:
        assert ray.get_actor("test-bank-1") is not None
        client = handle.client(timeout=20)  # within the waits below
        assert client.max_message_bytes == 32 << 20  # the shards' limit, which the client follows
        f = np.full((10, 8), 8**-0.5, np.float32)
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


def _files_holding(folder: str, secret: bytes, limit_bytes: int = 64 << 20) -> list[str]:
    """Files under `folder` (Ray's session: logs, sockets' neighbours, GCS files) that hold
    `secret`; files over `limit_bytes` are read up to it (bounded)."""
    hits = []
    for path in Path(folder).rglob("*"):
        try:
            if path.is_file() and not path.is_symlink():
                with open(path, "rb") as fh:
                    if secret in fh.read(limit_bytes):
                        hits.append(str(path))
        except OSError:  # a socket, or a file gone meanwhile
            continue
    return hits


def test_the_token_stays_out_of_rays_records(local_ray, tmp_path):
    token = "file-token-" + uuid.uuid4().hex
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    handles = [
        start_bank(
            2, 40, 4, "float32", snapshot_dir=str(tmp_path / "a"), name="token-file-bank", token_file=str(token_file)
        ),
        start_bank(1, 40, 4, "float32", snapshot_dir=str(tmp_path / "b"), name="token-env-bank", token_env=TOKEN_ENV),
    ]
    try:
        for handle in handles:
            with handle.client(timeout=20) as client:  # the shards read it, and require it
                assert client.lookup([1, 2]).shape == (2, 4)
            with pytest.raises(BankRpcError) as refused:
                BankClient(handle.addresses, timeout=20)
            assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
        # Nothing Ray wrote holds either token: its session folder (logs, GCS files), nor
        # the GCS's actor table (which keeps what each shard was constructed with).
        session = ray._private.worker._global_node.get_session_dir_path()
        for secret in (token, ENV_TOKEN):
            assert _files_holding(session, secret.encode()) == []
        from ray._private.state import state

        table = state._global_state_accessor.get_actor_table(None, None)
        assert table and not any(secret.encode() in entry for entry in table for secret in (token, ENV_TOKEN))
    finally:
        for handle in handles:
            handle.stop()


def test_a_missing_token_is_refused_before_any_shard_starts(local_ray, tmp_path):
    with pytest.raises(BankTokenMissing, match="cannot read the bank token file .*missing"):
        start_bank(
            1, 40, 4, "float32", snapshot_dir=str(tmp_path), name="no-bank", token_file=str(tmp_path / "missing")
        )
    with pytest.raises(BankTokenMissing, match="INSTDISC_TEST_UNSET_TOKEN"):
        start_bank(
            1, 40, 4, "float32", snapshot_dir=str(tmp_path), name="no-bank", token_env="INSTDISC_TEST_UNSET_TOKEN"
        )
