"""`instdisc bench bank` runs end to end on a small bank and writes its JSON."""

import json
import os
import subprocess
import sys

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


def test_the_raw_step_requests_are_the_clients_own_bytes_and_each_applies_its_update():
    """`bench bank`'s raw Steps are what BankClient sends, less the client id (so no call
    is taken for a retry), and a shard answers them as it answers the client."""
    import numpy as np

    from bank_server import wire
    from bank_server.client import _step_message
    from bank_server.shard import Layout, Shard
    from benchmarks.workload import MOMENTUM, StepWorkload, step_requests
    from protos import bank_pb2

    work = StepWorkload(rows=1000, dim=8, batch=16, seed=0, count=4)
    for shards in (1, 3):
        parts = step_requests(work, 5, negatives=64, shards=shards)
        assert len(parts) == shards
        for s, part in enumerate(parts):
            mine = work.indices(5) % shards == s
            reads = work.indices(6)[work.indices(6) % shards == s]
            expected = _step_message((work.indices(5)[mine], work.features(5)[mine], MOMENTUM, "", 0), reads,
                                     len(range(s, 64, shards)), None)
            assert part == expected.SerializeToString()
    from benchmarks.bank import _STEP_METHOD
    assert _STEP_METHOD == "/" + bank_pb2.DESCRIPTOR.services_by_name["MemoryBank"].full_name + "/Step"

    from bank_server.servicer import MemoryBankServicer

    servicer = MemoryBankServicer(max_message_bytes=16 << 20)
    servicer.shard = Shard.create(Layout(0, 1, 1000, 8, "float16"))
    request = bank_pb2.StepRequest.FromString(step_requests(work, 0, 64, 1)[0])
    for _ in range(2):  # the same bytes twice: applied twice
        answer = wire.parse_step_response(servicer.Step(request, None))
        assert answer.update_applied
    assert servicer.shard.updates_applied == 2
    assert len(np.frombuffer(answer.sample_indices.data, np.int64)) == 64


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
    assert all(ms > 0 for ms in result.values()), result
