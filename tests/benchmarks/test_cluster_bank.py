"""`python -m benchmarks.cluster_bank` on a tiny bank: a real 3-node local Ray cluster,
shards on distinct nodes, per-node numbers that add up, and nothing left running."""

import json
from pathlib import Path

import pytest
import ray

from benchmarks.cluster_bank import main
from tests.conftest import wait_until


def _ended(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return fields[0] in ("Z", "X")  # exited, waiting for a parent outside the benchmark to reap it


def test_a_tiny_bank_spreads_one_shard_per_node_and_everything_stops(tmp_path, capsys):
    assert main(["--rows", "3000", "--nodes", "3", "--dim", "16", "--steps", "5", "--batch", "32",
                 "--negatives", "64", "--output-dir", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    nodes, shards = results["nodes"], results["shards"]

    assert len(nodes) == 3 and len({n["node_id"] for n in nodes}) == 3
    assert sorted(s for n in nodes for s in n["shards"]) == [0, 1, 2]
    assert all(len(n["shards"]) == 1 for n in nodes)  # one shard per node
    assert len({s["node_id"] for s in shards}) == 3
    assert all(s["node_id"] == s["planned_node_id"] and s["actor_agrees"] for s in shards)
    assert sum(n["rows"] for n in nodes) == 3000
    assert sum(n["rows_fraction"] for n in nodes) == pytest.approx(1.0)
    assert [n["role"] for n in nodes].count("head") == 1

    for node in nodes:
        shard = shards[node["shards"][0]]
        assert 0 < shard["pss"] <= shard["rss"] <= shard["peak_rss"]
        assert shard["pid"] in {p["pid"] for p in node["processes"]}  # attributed to its own node
        assert node["node_pss_bytes"] > node["shard_pss_bytes"] > 0     # the raylet and agents come on top
        assert node["reserved_bytes"] <= node["memory_resource_bytes"]
    assert results["workload"]["step_p50_ms"] > 0

    table = (tmp_path / "results.md").read_text()
    assert table in capsys.readouterr().out
    assert all(n["node_id"][:12] in table for n in nodes)

    assert not ray.is_initialized()
    pids = [p["pid"] for n in nodes for p in n["processes"]]
    assert wait_until(lambda: all(_ended(pid) for pid in pids), timeout=20)


def test_a_bank_the_machine_cannot_hold_is_refused_before_anything_starts(capsys):
    assert main(["--rows", "1e12", "--nodes", "3"]) == 2
    message = capsys.readouterr().err
    assert "refused:" in message and "MemAvailable" in message and "Nothing was started" in message
    assert not ray.is_initialized()
