"""The bank and training runs on a real multi-node Ray cluster on this machine
(`ray.cluster_utils.Cluster`: a head and two worker nodes, each its own raylet with
explicit CPUs, memory and object store): shard actors spread over the nodes, a run on
external shard servers with two workers a node, and a run that survives a shard kill
and resumes on the nodes left."""

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray

from bank_server.client import BankClient
from bank_server.ray_bank import GIB, BankDoesNotFit, plan_placement, start_bank
from tests.conftest import free_port, wait_until
from tests.processes import ServerProcess
from tests.trainer.test_streaming import write_split
from tests.trainer.test_train_e2e import rows_of

NODE = {"num_cpus": 1, "memory": 2 * GIB, "object_store_memory": 100 << 20}


@pytest.fixture(scope="module")
def disks(tmp_path_factory) -> list[Path]:
    """Each node's own "local disk": its Ray processes see it as $NODE_DISK."""
    return [tmp_path_factory.mktemp(f"node-{i}-disk") for i in range(3)]


@pytest.fixture(scope="module")
def cluster(disks):
    from ray.cluster_utils import Cluster

    # The head's dashboard and agent on ports of their choosing: another Ray on this
    # machine may hold the defaults.
    nodes = Cluster(
        initialize_head=True,
        head_node_args={
            **NODE,
            "dashboard_port": None,
            "dashboard_agent_listen_port": None,
            "env_vars": {"NODE_DISK": str(disks[0])},
        },
    )
    for disk in disks[1:]:
        nodes.add_node(**NODE, env_vars={"NODE_DISK": str(disk)})
    nodes.wait_for_nodes()
    ray.init(address=nodes.address, log_to_driver=False)
    yield nodes
    ray.shutdown()
    nodes.shutdown()


def test_shards_spread_over_the_nodes_and_restart_on_their_own(cluster, disks):
    handle = start_bank(3, 3000, 8, "float32", snapshot_dir="$NODE_DISK/spread", name="spread-bank", timeout=120)
    try:
        where = ray.get([actor.node_id.remote() for actor in handle.actors])
        assert where == list(handle.nodes) and len(set(where)) == 3  # one shard per node
        # Each shard's folder is on its own node's disk, and only there.
        held = {disk: sorted(p.name for p in (disk / "spread").glob("shard-*")) for disk in disks}
        assert sorted(name for names in held.values() for name in names) == [f"shard-{s:05d}" for s in range(3)]
        assert all(len(names) == 1 for names in held.values()), held
        disk_of_shard_1 = next(disk for disk, names in held.items() if names == ["shard-00001"])
        assert {node["NodeID"] for node in ray.nodes() if node["Alive"]} == set(where)
        assert all("GiB reserved" in line for line in handle.describe())
        client = handle.client(timeout=30)  # within the wait below
        f = np.full((30, 8), 8**-0.5, np.float32)
        client.update(np.arange(30), f, 0.0)
        client.snapshot("before-crash")
        before = client.lookup(np.arange(3000)).copy()
        os.kill(ray.get(handle.actors[1].pid.remote()), signal.SIGKILL)  # a process this test started
        assert wait_until(lambda: np.array_equal(client.lookup(np.arange(1, 3000, 3)), before[1::3]), timeout=90)
        assert ray.get(handle.actors[1].node_id.remote()) == where[1]  # back on its node, by its snapshot
        assert client.describe()[1]["last_snapshot_tag"] == "before-crash"
        assert list((disk_of_shard_1 / "spread" / "shard-00001").glob("before-crash*"))
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


def actors_of(cls: str) -> list[dict]:
    """The live actors of class `cls` (name, node id, pid), from the GCS's actor table:
    Ray's state as `ray list actors` shows it, without needing the dashboard's server."""
    from ray._private.state import actors

    return [
        {"name": a["Name"], "node_id": a["Address"]["NodeID"], "pid": a["Pid"]}
        for a in actors(actor_state_name="ALIVE").values()
        if a["ActorClassName"] == cls
    ]


def steps_served(port: int) -> float:
    from tests.bank_server.test_metrics import scrape, value

    return value(scrape(port), "instdisc_bank_calls_total", method="Step")


def test_two_nodes_of_two_workers_send_one_step_per_node_to_external_shards_one_restarted(cluster, tmp_path, capsys):
    # 4 half-CPU workers, which Ray Train packs onto two 1-CPU nodes, train InfoNCE
    # against 2 shard processes this test runs (bank.addresses, a token, their update log
    # fsynced, Prometheus metrics), for 80 steps: an epoch of 64 and 16 of the next. Shard
    # 1 is SIGKILLed mid-epoch and restarted 3 s later with the same command and port, as
    # a StatefulSet restarts it; shard 0 counts the Steps it served.
    from tests.trainer.test_faults import SMALL, Run, assert_outages_of, assert_token_nowhere, said_outage_of

    token = secrets.token_hex(16)
    (tmp_path / "token").write_text(token + "\n")
    ports, metrics = [free_port(), free_port()], [free_port(), free_port()]

    def shard(s: int, *more: str) -> ServerProcess:
        args = ["-m", "bank_server", "--shard-id", str(s), "--num-shards", str(2), "--rows", "2048"]
        args += ["--port", str(ports[s]), "--snapshot-dir", str(tmp_path / "bank"), "--fsync", "always"]
        args += ["--token-file", str(tmp_path / "token"), "--metrics-port", str(metrics[s]), *more]
        server = ServerProcess(args, stderr=tmp_path / f"shard-{s}-{time.monotonic_ns()}.log")
        server.wait_serving(120)
        return server

    servers = [shard(0), shard(1)]
    addresses = ",".join(server.address for server in servers)
    overrides = ["train.workers=4", "train.cpus_per_worker=0.5", "train.steps=80", "loss.kind=infonce"]
    overrides += ["eval.source=fresh", "eval.every=64", f"bank.token_file={tmp_path / 'token'}"]
    overrides += [f"bank.addresses={addresses}"]
    run = Run(tmp_path / "out", overrides, env={**os.environ, "RAY_ADDRESS": cluster.address}, name="external")
    try:
        run.wait_for(r"epoch 1/2 step \d+/80", 300)
        servers[1].proc.kill()  # SIGKILL, of a process this test started
        servers[1].proc.wait(30)
        time.sleep(3)
        servers.append(shard(1))
        logs = run.finish()
    finally:
        run.stop()
    try:
        assert "one Step per node per shard; workers per node: [2, 2]" in logs, logs[-4000:]
        # A node sends a Step per step, and between pauses its first lookups and its
        # last update: about 2 per step, where one Step per worker would be over 4.
        assert 2 * 80 < steps_served(metrics[0]) <= 2.3 * 80
        with BankClient(addresses, token=token) as client:
            # Every update once: the warm start's 2,048 rows, then 80 steps of 32.
            assert sum(d["rows_updated"] for d in client.describe()) == 2048 + 80 * 32
        assert said_outage_of(logs, 1), logs[-5000:]
        summary = run.summary()
        assert_outages_of(summary, 1)
        assert summary["worker_restarts"] == 0 and (summary["epochs"], summary["steps"]) == (1.25, 80), summary
        # kNN on fresh features with no refresh: nothing but training wrote the bank.
        assert summary["loss"] == "infonce" and summary["knn_epoch"] == 1.25 and summary["knn_source"] == "fresh"
        assert summary["refresh_seconds"] is None and np.isfinite(summary["final_loss"])
        assert [int(r["step"]) for r in rows_of(run.output)] == [0, 64, 80]
        assert list((tmp_path / "bank" / "shard-00001").glob("epoch-0001-step-80.arrow"))
        assert_token_nowhere(token, run.output, logs)

        # Running shards of another count are not the run's to reshard: the resume
        # refuses, before Ray starts, with the command that would.
        for s in range(3):
            args = ["-m", "bank_server", "--shard-id", str(s), "--num-shards", "3", "--rows", "2048", "--port", "0"]
            servers.append(ServerProcess(args, stderr=tmp_path / f"other-{s}.log"))
        others = ",".join(server.address for server in servers[-3:])
        from trainer.cli import main

        rerun = ["train", "--output-dir", str(run.output), "--name", "external", *SMALL, *overrides]
        assert main([*rerun, "train.steps=100", f"bank.addresses={others}"]) == 2
        err = capsys.readouterr().err
        assert "its bank had 2 shards, bank.addresses names 3" in err, err[-2000:]
        assert "instdisc bank reshard SNAPSHOT_DIR NEW_DIR --shards 3 --tag epoch-0001-step-80" in err
    finally:
        for server in servers:
            server.stop()


def test_a_run_across_nodes_survives_a_shard_kill_and_resumes_on_the_nodes_left(cluster, tmp_path, capsys):
    # Last in this module: it takes a node away. Trained on streamed Parquet over the 3
    # nodes, a shard killed mid-run; then a node it used is gone, and the same run
    # resumes on the 2 left, its bank (in a folder every node sees) resharded 2 -> 3.
    data = tmp_path / "data"
    write_split(data, "train", [700, 700, 600], group_rows=100)  # 3 files, 20 row groups
    write_split(data, "validation", [200], group_rows=100)  # Hugging Face's name for it
    output = tmp_path / "out"
    log = tmp_path / "run.log"
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    with open(log, "w") as sink:
        run = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "trainer",
                "--output-dir",
                str(output),
                "--name",
                "nodes",
                "data.name=parquet",
                f"data.root={data}",
                "data.image_size=8",
                "train.workers=2",
                "train.cpus_per_worker=1",
                "train.batch_size=32",
                "train.epochs=1",
                "train.log_every=5",
                "train.refresh_bank_every=0",
                "bank.shards=2",
                "bank.dtype=float32",
                "loss.negatives=256",
                "eval.k=20",
                "data.loader_workers=1",
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        text = lambda: log.read_text(errors="replace")  # noqa: E731
        assert wait_until(lambda: re.search(r"epoch 1/1 step \d+/62", text()) or run.poll() is not None, 240), text()[
            -3000:
        ]
        assert run.poll() is None, text()[-3000:]
        workers = actors_of("RayTrainWorker")
        assert len(workers) == 2 and len({w["node_id"] for w in workers}) == 2, workers  # one per node
        shards = sorted(actors_of("BankShardActor"), key=lambda a: a["name"])
        assert len(shards) == 2 and len({s["node_id"] for s in shards}) == 2, shards
        os.kill(shards[1]["pid"], signal.SIGKILL)  # a process of the cluster this test started
        assert run.wait(300) == 0, text()[-5000:]
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(30)
    logs = text()
    assert "streamed from 3 Parquet file(s)" in logs
    assert len(re.findall(r"shard \d: node \w+ at [\d.]+:\d+, [\d.]+ GiB reserved", logs)) == 2
    summary = json.loads((output / "summary.json").read_text())
    assert summary["epochs"] == 1 and summary["steps"] == 62 and summary["bank_outages"] >= 1, summary
    assert summary["evaluated"] == ["knn"] and 0 < summary["knn_top1"] <= 1, summary
    # TensorBoard's points, written while the run trained by the writer on the driver's node.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(output / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(5, 65, 5))

    # A node the run used is gone (not the head: the driver's); the run resumes on the rest.
    head = cluster.head_node.node_id
    gone = next(s["node_id"] for s in shards if s["node_id"] != head)
    cluster.remove_node(next(node for node in cluster.list_all_nodes() if node.node_id == gone))
    assert wait_until(lambda: sum(node["Alive"] for node in ray.nodes()) == 2, timeout=60)
    # A point past the checkpoint (step 62), as an attempt that died after it leaves one.
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(output / "tensorboard")) as stale:
        stale.add_scalar("train/loss", 99.0, 65)
    # In this process, joined to the cluster: the shard count goes 2 -> 3 on 2 nodes.
    from trainer.cli import main

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_ADDRESS", cluster.address)
        assert main(["train", *run.args[3:], "train.epochs=0", "train.steps=70", "bank.shards=3"]) == 0
    logs = "".join(capsys.readouterr())
    assert "bank resharded 2 -> 3 shards (2,000 rows" in logs, logs[-4000:]
    assert "resuming run 'nodes' from its checkpoint at step 62" in logs, logs[-4000:]
    summary = json.loads((output / "summary.json").read_text())
    assert summary["steps"] == 70 and summary["evaluated"] == ["knn"] and 0 < summary["knn_top1"] <= 1, summary
    # The checkpoint's history and outages came back: the steps before 62 were not trained again.
    assert summary["bank_outages"] >= 1 and [int(r["step"]) for r in rows_of(output)] == [0, 62, 70]
    bank = output / "bank" / "nodes"
    assert sorted(p.name for p in bank.glob("shard-*/epoch-0001-step-70.arrow")) == ["epoch-0001-step-70.arrow"] * 3
    assert list(bank.parent.glob("nodes.2-shards-*/shard-00001/epoch-0001-step-62.arrow"))  # the old layout, kept
    # The same curves go on, each step once: the stale point gave way to the resume's.
    events = EventAccumulator(str(output / "tensorboard"))
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(5, 75, 5)) and all(e.value != 99.0 for e in loss)
