"""`instdisc scale bank` on a tiny grid of real shard servers: every number it writes
is finite and positive, the outputs are readable, and a bank too large for the
machine is refused before anything starts."""

import argparse
import math

import matplotlib.image
import pyarrow.parquet as pq
import pytest

from benchmarks.bank_grid import Bank, memory_need, plan_grid
from benchmarks.scale_bank import add_scale_bank_arguments, run_scale_bank

REQUIRED = ("rows", "shards", "negatives", "dtype", "clients", "step_p50_ms", "step_p99_ms", "rows_per_s",
            "bytes_per_row")
MEASURED = ("step_p50_ms", "step_p99_ms", "rows_per_s", "steps_per_s", "sample_p50_ms", "lookup_p50_ms",
            "update_p50_ms", "partition_sum_ms", "topk_ms", "startup_s", "rss_bytes", "snapshot_bytes",
            "snapshot_write_gbps", "disk_write_gbps", "restore_gbps", "step_request_bytes", "step_answer_bytes")


def scale_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_scale_bank_arguments(parser)
    return parser.parse_args(["--quick", "--dim", "16", "--batch", "32", "--iters", "8", *argv])


def test_grid_sweeps_one_axis_at_a_time_around_the_base():
    points, base = plan_grid([10**4, 10**6, 10**8], [1, 2, 4], [256, 4096, 65536], ["float16", "float32"],
                             [1, 2, 4], dim=128)
    assert base.bank == Bank(10**6, 2, 128, "float16") and (base.negatives, base.clients) == (4096, 1)
    # N x S, plus two more K, one more dtype and two more client counts at the base.
    assert len(points) == 9 + 2 + 1 + 2
    assert len({p.bank for p in points}) == 9 + 1
    assert len(set(points)) == len(points)


def test_tiny_sweep_writes_finite_numbers_table_and_plots(tmp_path, capsys):
    out = tmp_path / "scale"
    args = scale_args("--rows", "2000,4000,1e11", "--shards", "1,2", "--negatives", "256", "--dtypes", "float16",
                      "--clients", "1,2", "--output-dir", str(out))
    assert run_scale_bank(args) == 0
    printed = capsys.readouterr().out
    # The bank that cannot fit is refused up front, with its need and what is available.
    need = memory_need(Bank(10**11, 1, 16, "float16"), 1) / (1 << 30)  # shard.py's model: the rows once
    assert f"skipping N=1e11 S=1 float16: needs {need:.1f} GiB" in printed and "GiB available" in printed
    assert "Step latency flat in N (S=1" in printed and "float16 memory per row" in printed

    table = pq.read_table(out / "results.parquet").to_pylist()
    assert set(REQUIRED) <= set(table[0])
    # N x S = 2 x 2 banks that fit, and the base (N=4000, S=1) again with 2 clients.
    assert sorted((r["rows"], r["shards"], r["clients"]) for r in table) == [
        (2000, 1, 1), (2000, 2, 1), (4000, 1, 1), (4000, 1, 2), (4000, 2, 1)]
    for row in table:
        for key in MEASURED:
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)
        assert row["step_p99_ms"] >= row["step_p50_ms"]
        assert math.isfinite(row["bytes_per_row"]) and row["load_1m"] >= 0
        assert row["raw_bytes_per_row"] == 16 * 2
        assert row["snapshot_bytes"] >= row["rows"] * 16 * 2

    markdown = (out / "results.md").read_text()
    assert "## Targets" in markdown and "## Capacity model" in markdown and f"needs {need:.1f} GiB" in markdown
    assert markdown.count("| float16 |") >= len(table)
    for name in ("latency_vs_rows.png", "throughput_vs_clients.png", "latency_vs_negatives.png"):
        image = matplotlib.image.imread(out / name)
        assert image.shape[0] > 100 and image.shape[1] > 100
    assert [p.name for p in out.iterdir() if p.name.startswith(".scale-")] == []


@pytest.mark.timeout(30)
def test_grid_that_cannot_fit_is_refused_without_starting(tmp_path, capsys):
    out = tmp_path / "scale"
    args = scale_args("--rows", "1e11", "--shards", "1", "--negatives", "256", "--dtypes", "float32",
                      "--clients", "1", "--output-dir", str(out))
    assert run_scale_bank(args) == 2
    captured = capsys.readouterr()
    need = memory_need(Bank(10**11, 1, 16, "float32"), 1) / (1 << 30)
    assert f"skipping N=1e11 S=1 float32: needs {need:.1f} GiB" in captured.out
    assert "no point of this grid fits" in captured.err
    assert list(out.iterdir()) == []
