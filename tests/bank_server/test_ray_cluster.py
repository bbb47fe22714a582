"""The bank on a real multi-node Ray cluster on this machine (`ray.cluster_utils.Cluster`:
a head and two worker nodes, each its own raylet with explicit memory)."""

import os
import signal

import numpy as np
import pytest
import ray

from bank_server.ray_bank import GIB, BankDoesNotFit, plan_placement, start_bank
from tests.conftest import wait_until

NODE = {"num_cpus": 1, "memory": 2 * GIB, "object_store_memory": 100 << 20}


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    nodes = Cluster(initialize_head=True, head_node_args=NODE)
    for _ in range(2):
        nodes.add_node(**NODE)
    nodes.wait_for_nodes()
    ray.init(address=nodes.address, log_to_driver=False)
    yield nodes
    ray.shutdown()
    nodes.shutdown()


def test_shards_spread_over_the_nodes_and_restart_on_their_own(cluster, tmp_path):
    handle = start_bank(3, 3000, 8, "float32", snapshot_dir=str(tmp_path), name="spread-bank", timeout=120)
    try:
        where = ray.get([actor.node_id.remote() for actor in handle.actors])
        assert where == list(handle.nodes) and len(set(where)) == 3  # one shard per node
        assert {node["NodeID"] for node in ray.nodes() if node["Alive"]} == set(where)
        assert all("GiB reserved" in line for line in handle.describe())
        client = handle.client(timeout=30)  # within the wait below
        f = np.full((30, 8), 8 ** -0.5, np.float32)
        client.update(np.arange(30), f, 0.0)
        client.snapshot("before-crash")
        before = client.lookup(np.arange(3000)).copy()
        os.kill(ray.get(handle.actors[1].pid.remote()), signal.SIGKILL)  # a process this test started
        assert wait_until(lambda: np.array_equal(client.lookup(np.arange(1, 3000, 3)), before[1::3]), timeout=90)
        assert ray.get(handle.actors[1].node_id.remote()) == where[1]  # back on its node, by its snapshot
        assert client.describe()[1]["last_snapshot_tag"] == "before-crash"
        client.close()
    finally:
        handle.stop()


def test_a_bank_that_does_not_fit_is_refused_before_anything_starts(cluster, tmp_path):
    with pytest.raises(BankDoesNotFit, match=r"3 shard\(s\) need 2\.\d\d, 2\.\d\d, 2\.\d\d GiB each") as refused:
        # 4e6 float32 rows of 128 are 1.91 GiB a shard: with a snapshot block and the process, over 2 GiB.
        start_bank(3, 3 * 4_000_000, 128, "float32", snapshot_dir=str(tmp_path), name="huge-bank")
    assert str(refused.value).count("GiB free") == 3  # every node's numbers
    for shard in range(3):
        with pytest.raises(ValueError):
            ray.get_actor(f"huge-bank-{shard}")


def test_the_plan_spreads_first_and_shares_a_node_only_when_it_must():
    assert plan_placement([5, 5, 5], {"a": 20, "b": 10, "c": 10}) == ["a", "b", "c"]
    assert plan_placement([5, 5, 5, 5], {"a": 20, "b": 10}) == ["a", "b", "a", "b"]
    assert plan_placement([5, 5, 5], {"a": 30, "b": 5}) == ["a", "b", "a"]  # b is full after one
    with pytest.raises(BankDoesNotFit, match="node a"):
        plan_placement([5, 5, 5], {"a": 12})
