"""`instdisc bench bank` runs end to end on a small bank and writes its JSON."""

import json
import os
import subprocess
import sys

import pytest

from bank_server.shard import rows_on_shard


def test_bench_bank_prints_and_writes_numbers(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "-m", "trainer.cli", "bench", "bank", "--rows", "5000", "--negatives", "256",
                           "--batch", "32", "--iters", "10", "--warmup", "2", "--shards", "1,2", "--clients", "1,2",
                           "--client-iters", "5", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "step/echo" in done.stdout
    results = json.loads(out.read_text())
    assert [r["shards"] for r in results] == [1, 2]
    for r in results:
        for key in ("step_p50_ms", "step_p99_ms", "raw_p50_ms", "echo_p50_ms", "inprocess_p50_ms", "rows_per_s"):
            assert r[key] > 0
        assert r["step_p99_ms"] >= r["step_p50_ms"]
        assert set(r["shard_calls_per_s"]) == {"1", "2"} and min(r["shard_calls_per_s"].values()) > 0
    assert "calls/s one shard process sustains" in done.stdout
    cores = len(os.sched_getaffinity(0))
    if cores < 2:
        assert all(r["own_cores"] is None for r in results)
        return
    assert "each shard process on a core of its own" in done.stdout
    for r in results:
        own = r["own_cores"]
        assert min(own["calls_per_s"].values()) > 0  # (CPU per call may be below the clock's 10 ms ticks)
        # Too few cores for every shard and the clients: one shard serving what each of the bank's serves.
        alone = cores < r["shards"] + 1
        assert own["alone"] == alone
        share = (1, rows_on_shard(5000, r["shards"], 0), len(range(0, 32, r["shards"])), len(range(0, 256, r["shards"])))
        expected = share if alone else (r["shards"], 5000, 32, 256)
        assert (own["shards"], own["rows"], own["batch"], own["negatives"]) == expected


def test_bench_bank_load_test_runs_for_its_duration_with_logged_shards(tmp_path):
    out = tmp_path / "load.json"
    done = subprocess.run([sys.executable, "-m", "trainer.cli", "bench", "bank", "--rows", "5000", "--negatives", "256",
                           "--batch", "32", "--iters", "5", "--warmup", "1", "--shards", "2", "--clients", "2",
                           "--duration", "2", "--fsync", "everysec", "--log-dir", str(tmp_path / "logs"),
                           "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "load test: --clients 2 for 2 s each, shards with --fsync everysec" in done.stdout
    [r] = json.loads(out.read_text())
    assert r["fsync"] == "everysec" and r["duration"] == 2
    assert r["clients_errors"] == {"2": 0} and r["clients_outages"] == {"2": []}
    assert 1.5 <= r["clients_seconds"]["2"] < 30 and r["clients_steps"]["2"] > 0
    assert r["clients_step_max_ms"]["2"] >= r["clients_step_p99_ms"]["2"] >= r["clients_step_p50_ms"]["2"] > 0
    assert r["shard_calls_per_s"]["2"] > 0 and r["shard_rows_per_s"]["2"] > 0
    # The shards logged their updates where they were told.
    assert list((tmp_path / "logs" / "shards-2" / "shard-00001").glob("log-*.wal"))


@pytest.mark.parametrize("shards", [1, 2])
def test_raw_steps_are_the_clients_own_requests_and_each_call_applies_its_update(shards):
    """`bench bank`'s raw Steps are what BankClient sent for each batch, less the client
    id and sequence; sent as bytes (RawCalls) every call applies its update."""
    import numpy as np

    from bank_server.client import BankClient
    from bank_server.server import BankServer, ServerConfig
    from benchmarks.bank import _STEP_METHOD, recorded_step_requests
    from benchmarks.echo import RawCalls
    from benchmarks.workload import StepWorkload
    from protos import bank_pb2

    rows, dim, negatives = 1000, 8, 64
    servers = [BankServer(ServerConfig(shard_id=s, num_shards=shards, rows=rows, dim=dim, port=0)).start()
               for s in range(shards)]
    try:
        for server in servers:
            server.load()
        work = StepWorkload(rows, dim, batch=16, seed=0, count=4)
        with BankClient([server.address for server in servers]) as client:
            recorded = recorded_step_requests(client, work, negatives)
            assert len(recorded) == len(work) and all(len(step) == shards for step in recorded)
            for i, step in enumerate(recorded):
                requests = [bank_pb2.StepRequest.FromString(b) for b in step]
                assert sum(r.sample_k for r in requests) == negatives
                for s, r in enumerate(requests):
                    assert (r.update.client_id, r.update.sequence) == ("", 0)
                    mine = work.indices(i) % shards == s
                    got = np.frombuffer(r.update.indices.data, np.int64)
                    assert sorted(got) == sorted(work.indices(i)[mine])
                    features = np.frombuffer(r.update.features.data, np.float32).reshape(-1, dim)
                    by_index = dict(zip(work.indices(i)[mine], work.features(i)[mine]))
                    assert all((features[j] == by_index[g]).all() for j, g in enumerate(got))
                    reads = np.frombuffer(r.lookup_indices.data, np.int64)
                    assert sorted(reads) == sorted(work.indices(i + 1)[work.indices(i + 1) % shards == s])
            before = [d["updates_applied"] for d in client.describe()]
            raw = RawCalls([server.address for server in servers], _STEP_METHOD, recorded)
            try:
                raw(0)
                raw(0)  # the same bytes again: applied again, not taken for a retry
            finally:
                raw.close()
            assert [d["updates_applied"] for d in client.describe()] == [b + 2 for b in before]
        # Negatives over one message go out in a second wave: no raw Step stands for that.
        with BankClient([server.address for server in servers], chunk_bytes=1024) as small:
            assert recorded_step_requests(small, work, negatives=200) is None
    finally:
        for server in servers:
            server.stop(grace=0, final_snapshot=False)


def test_timed_turns_calls_everything_with_i_before_i_plus_1_rotating_who_goes_first():
    from benchmarks.timing import timed_turns

    order = []
    fns = [lambda i, name=name: order.append((name, i)) for name in "abc"]
    seconds = timed_turns(fns, iters=4, warmup=2)
    assert [len(s) for s in seconds] == [4, 4, 4]  # warm-up calls are not timed
    assert order == [("a", 0), ("b", 0), ("c", 0), ("b", 1), ("c", 1), ("a", 1), ("c", 2), ("a", 2), ("b", 2),
                     ("a", 3), ("b", 3), ("c", 3), ("b", 4), ("c", 4), ("a", 4), ("c", 5), ("a", 5), ("b", 5)]


def test_a_load_test_with_failed_steps_exits_1_saying_so(capsys):
    from argparse import Namespace

    from benchmarks.bank import _report_load

    counts = {"clients_steps": 10, "clients_step_p50_ms": 1.0, "clients_step_p99_ms": 2.0, "clients_step_max_ms": 3.0,
              "shard_calls_per_s": 5.0, "shard_rows_per_s": 50.0, "clients_outages": []}
    result = {"shards": 2, **{k: {2: v} for k, v in counts.items()}}
    args = Namespace(clients=[2], duration=1.0, fsync=None, json_path=None)
    assert _report_load(args, [{**result, "clients_errors": {2: 0}, "clients_error_messages": {2: []}}]) == 0
    failed = {**result, "clients_errors": {2: 3}, "clients_error_messages": {2: ["BankRpcError: x: UNAVAILABLE"]}}
    assert _report_load(args, [failed]) == 1
    printed = capsys.readouterr().out
    assert "FAILED: 2 shard(s), 2 client(s): 3 failed Step(s), e.g. BankRpcError: x: UNAVAILABLE" in printed


def test_bench_parts_times_every_part_including_the_whole_handler():
    from benchmarks.step_parts import measure

    result = measure(rows=2000, dim=16, dtype="float16", negatives=64, batch=32, iters=5)
    assert "server: the whole Step handler (decode, validate, update, reads, encode)" in result
    assert "client, 2 shards: merge the answers' negatives" in result
    assert all(ms > 0 for ms in result.values()), result
