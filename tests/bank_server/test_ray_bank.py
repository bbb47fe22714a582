"""The bank as Ray actors on a real local Ray (num_cpus=2)."""

import numpy as np
import pytest
import ray

from bank_server.ray_bank import start_bank
from tests.conftest import wait_until


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_actor_shards_serve_and_restore_after_a_crash(local_ray, tmp_path):
    handle = start_bank(2, 100, 8, "float32", snapshot_dir=str(tmp_path), name="test-bank")
    try:
        assert ray.get_actor("test-bank-1") is not None
        client = handle.client(timeout=60)
        f = np.full((10, 8), 8 ** -0.5, np.float32)
        client.update(np.arange(10), f, 0.0)
        saved = client.lookup(np.arange(100)).copy()
        client.snapshot("checkpoint")
        client.update(np.arange(10), -f, 0.0)  # after the snapshot: lost in the crash
        ray.kill(handle.actors[0], no_restart=False)
        # The kill lands asynchronously; calls meanwhile retry UNAVAILABLE until the
        # restarted actor has restored its snapshot.
        assert wait_until(lambda: np.array_equal(client.lookup(np.arange(0, 100, 2)), saved[0::2]), timeout=60)
        after = client.lookup(np.arange(100))
        np.testing.assert_allclose(after[1:10:2], -f[1::2], atol=1e-6)  # shard 1 never crashed
        assert client.describe()[0]["last_snapshot_tag"] == "checkpoint"
        client.close()
    finally:
        handle.stop()
