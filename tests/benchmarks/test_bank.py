"""`instdisc bench bank` runs end to end on a small bank and writes its JSON."""

import json
import subprocess
import sys


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
        for key in ("step_p50_ms", "step_p99_ms", "echo_p50_ms", "inprocess_p50_ms", "rows_per_s"):
            assert r[key] > 0
        assert r["step_p99_ms"] >= r["step_p50_ms"]
        assert set(r["shard_calls_per_s"]) == {"1", "2"} and min(r["shard_calls_per_s"].values()) > 0
    assert "calls/s one shard process sustains" in done.stdout
