"""One smoke test per benchmark command users run: the real command with tiny sizes,
checked on its return code and its outputs. Then the pure parts that carry logic."""

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from benchmarks import trained_bank
from benchmarks.scale_bank import plan
from benchmarks.scale_data import checks
from benchmarks.scale_train import SOFTMAX, Grid, TrainPoint, plan_points
from benchmarks.train import split_cores
from trainer.cli import build_parser, main

TWO_CORES = len(os.sched_getaffinity(0)) >= 2
# One small, quick training run: what the sweeps' points are made of.
TINY_RUN = ["train.epochs=1", "train.workers=1", "model.width=8", "eval.k=20"]


@pytest.fixture(scope="module")
def local_ray():
    """One private local Ray for this module's training runs (launch joins it)."""
    import ray

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def instdisc(*args, timeout=300, statuses=(0,)):
    done = subprocess.run(
        [sys.executable, "-m", "trainer.cli", *map(str, args)], capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode in statuses, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_bench_bank_times_step_echo_and_in_process(tmp_path):
    instdisc(
        "bench",
        "bank",
        "--rows",
        5000,
        "--negatives",
        256,
        "--batch",
        32,
        "--iters",
        10,
        "--warmup",
        2,
        "--shards",
        "1,2",
        "--json",
        tmp_path / "bank.json",
    )
    results = json.loads((tmp_path / "bank.json").read_text())
    assert [r["shards"] for r in results] == [1, 2]
    for r in results:
        assert r["step_p99_ms"] >= r["step_p50_ms"] > 0 and r["echo_p50_ms"] > 0 and r["inprocess_p50_ms"] > 0
        assert r["step_over_echo"] == pytest.approx(r["step_p50_ms"] / r["echo_p50_ms"])
        assert r["request_bytes"] > 32 * 128 * 4 and r["answer_bytes"] > 256 * 128 * 2  # features in, rows out


def test_scale_fan_in_counts_one_step_per_node_when_aggregated(tmp_path):
    args = ["--shards", 1, "--workers", 4, "--nodes", 2, "--rate", 10, "--seconds", 1, "--rows", 5000]
    instdisc("scale", "fan-in", *args, "--negatives", 64, "--output-dir", tmp_path, timeout=300)
    rows = {r["aggregate"]: r for r in pq.read_table(tmp_path / "results.parquet").to_pylist()}
    # 4 workers at 10 steps/s: about 40 Steps a second, or 20 as 2 nodes.
    off, on = rows["off"]["calls_per_s_per_shard"], rows["on"]["calls_per_s_per_shard"]
    assert 30 <= off <= 50 and 1.7 <= off / on <= 2.3
    assert all(r["step_p99_ms"] >= r["step_p50_ms"] > 0 and r["gpus_per_shard"] > 0 for r in rows.values())
    assert (tmp_path / "calls_per_s_per_shard.png").exists()


def test_bench_reshard_times_the_command_and_checks_a_sample_of_rows():
    done = instdisc("bench", "reshard", "--rows", 3000, "--dim", 16, "--updates", 5, timeout=120)
    assert "3,000 rows x 16 float16" in done.stdout and "3000 of 3000 sampled rows byte-identical" in done.stdout


def test_bench_train_compares_the_remote_bank_with_an_in_process_one(tmp_path):
    bank_cores = 1 if TWO_CORES else 0
    done = instdisc(
        "bench",
        "train",
        "--steps",
        4,
        "--warmup",
        1,
        "--batch",
        32,
        "--negatives",
        256,
        "--width",
        8,
        "--rounds",
        2,
        "--bank-cores",
        bank_cores,
        "--json",
        tmp_path / "train.json",
    )
    assert "dropped" not in done.stderr  # the last step's update went out: the remote loop ended cleanly
    result = json.loads((tmp_path / "train.json").read_text())
    assert result["remote_images_per_sec"] > 0 and result["inprocess_images_per_sec"] > 0
    assert result["ratio"] == pytest.approx(result["remote_images_per_sec"] / result["inprocess_images_per_sec"])
    if bank_cores:  # read back from the processes' threads, not echoed from the arguments
        cores = sorted(os.sched_getaffinity(0))
        assert (result["bank_cpus"], result["train_cpus"]) == (cores[:1], cores[1:])
        assert result["torch_threads"] == len(cores) - 1


def test_bench_defaults_trains_on_an_unseen_set_and_scores_raw_pixels(tmp_path, local_ray):
    status = main(["bench", "defaults", "--output-dir", str(tmp_path), "--sets", "digits", *TINY_RUN])
    [row] = pq.read_table(tmp_path / "results.parquet").to_pylist()
    assert status == (0 if row["holds"] else 1)
    assert row["set"] == "digits" and row["classes"] == 10 and row["train_images"] + row["test_images"] == 1797
    assert 0.1 < row["knn_top1_pixels"] <= 1 and 0 < row["knn_top1"] <= 1 and 0 < row["knn_top1_untrained"] <= 1
    assert (tmp_path / "points" / "digits" / "summary.json").exists()
    assert "| digits |" in (tmp_path / "results.md").read_text()
    assert main(["bench", "defaults", "--output-dir", str(tmp_path), "--sets", "digits,cifar"]) == 2


def test_scale_bank_sweeps_each_axis_and_skips_what_cannot_fit(tmp_path):
    done = instdisc(
        "scale",
        "bank",
        "--dim",
        16,
        "--batch",
        32,
        "--iters",
        8,
        "--rows",
        "2000,4000,1e11",
        "--shards",
        "1,2",
        "--negatives",
        256,
        "--dtypes",
        "float16",
        "--clients",
        "1,2",
        "--output-dir",
        tmp_path,
    )
    assert "skipping N=100,000,000,000 S=1 float16: needs" in done.stdout
    rows = pq.read_table(tmp_path / "results.parquet").to_pylist()
    # N x S = 2 x 2 banks that fit, and the base (N=4000, S=1) again with 2 clients.
    assert sorted((r["rows"], r["shards"], r["clients"]) for r in rows) == [
        (2000, 1, 1),
        (2000, 2, 1),
        (4000, 1, 1),
        (4000, 1, 2),
        (4000, 2, 1),
    ]
    for r in rows:
        assert r["step_p99_ms"] >= r["step_p50_ms"] > 0 and r["rows_per_s"] > 0 and r["startup_s"] > 0
        assert r["raw_bytes_per_row"] == 32 and r["rss_bytes"] > 0
    assert "| float16 | 4,000 |" in (tmp_path / "results.md").read_text()  # the capacity model
    for name in ("latency_vs_rows", "throughput_vs_clients", "latency_vs_negatives"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
    assert main(["scale", "bank", "--rows", "1e11", "--shards", "1", "--output-dir", str(tmp_path / "no")]) == 2
    assert not (tmp_path / "no").exists()


def test_scale_bank_reshards_a_trained_bank_and_serves_the_same_rows_at_every_shard_count(
    tmp_path, capsys, monkeypatch
):
    """A run folder as training leaves it: two logged shards with snapshot epoch-1, updates
    after it, and a checkpoint naming epoch-1."""
    import numpy as np
    import torch

    from bank_server import recovery
    from bank_server.shard import Layout

    rng, folder = np.random.default_rng(0), tmp_path / "run" / "bank" / "tiny"
    for sid in range(2):
        shard, _ = recovery.open_logged(Layout(sid, 2, 600, 8, "float16"), folder, seed=0, fsync="no")
        for sequence, tag in enumerate(("epoch-1", None)):
            shard.momentum_update(np.arange(sid, 600, 2)[:50], rng.standard_normal((50, 8)), 0.5, "t", sequence)
            if tag:
                shard.snapshot(folder, tag)
        shard.log.close()
    (tmp_path / "run" / "checkpoint").mkdir()
    torch.save({"bank_snapshot": "epoch-1", "config": {"bank": {}}}, tmp_path / "run" / "checkpoint" / "state.pt")
    args = ["scale", "bank", "--bank", str(tmp_path / "run"), "--shards", "1,2", "--iters", "5", "--batch", "16"]
    assert main([*args, "--negatives", "64,1000", "--clients", "1", "--output-dir", str(tmp_path / "out")]) == 0
    assert "not swept: negatives [1000], more than the bank's rows" in capsys.readouterr().out
    rows = pq.read_table(tmp_path / "out" / "results.parquet").to_pylist()
    assert sorted(r["shards"] for r in rows) == [1, 2]
    for r in rows:
        assert (r["rows"], r["dim"], r["dtype"], r["negatives"]) == (600, 8, "float16", 64) and r["same_bank"]
        assert r["step_p99_ms"] >= r["step_p50_ms"] > 0 and r["startup_s"] > 0 and r["bank"].endswith("epoch-1")
    assert "At every S the same 600 sampled rows" in (tmp_path / "out" / "results.md").read_text()
    with pytest.raises(SystemExit, match="--bank takes the rows and the dtype from the run's bank"):
        main([*args, "--rows", "10"])
    # A layout that serves other rows (the 2 shards from LATEST and the log, not epoch-1) is caught.
    reshard = trained_bank.reshard
    monkeypatch.setattr(
        trained_bank, "reshard", lambda src, dest, n, tag: reshard(src, dest, n, tag if n < 2 else None)
    )
    with pytest.raises(RuntimeError, match="resharded into 2 shards is not the one served by 1: 100 of 600 sampled"):
        main([*args, "--negatives", "64", "--clients", "1", "--output-dir", str(tmp_path / "other")])


def test_scale_train_trains_each_point_once_and_reads_it_back(tmp_path, local_ray, capsys):
    args = [
        "scale",
        "train",
        "--quick",
        "--negatives",
        "16",
        "--fixed-subset",
        "1000",
        "--subsets",
        "1000",
        "--output-dir",
        str(tmp_path),
        *TINY_RUN[1:],
    ]
    assert main(args) == 0
    [row] = pq.read_table(tmp_path / "results.parquet").to_pylist()
    assert (row["point"], row["sweeps"], row["bank_rows"], row["error"]) == (
        "nce-k16-rows1000-e1",
        "negatives+bank size",
        1000,
        None,
    )
    assert 0 < row["knn_top1"] <= row["knn_top5"] <= 1 and row["knn_top1_gain"] == pytest.approx(
        row["knn_top1"] - row["knn_top1_untrained"]
    )
    assert (tmp_path / "knn_vs_negatives.png").exists() and (tmp_path / "knn_vs_bank_size.png").exists()
    logs = (tmp_path / "points" / row["point"] / "log.txt").read_text()
    capsys.readouterr()
    assert main(args) == 0 and "(reused)" in capsys.readouterr().out
    assert (tmp_path / "points" / row["point"] / "log.txt").read_text() == logs  # not trained again
    for wrong in (["loss.negatives=8"], ["train.lr=0.01"], ["--negatives", "5000"]):  # swept key, other config, K > N
        assert main([*args, *wrong]) == 2


def test_scale_data_streams_a_set_and_reads_it_into_memory(tmp_path):
    done = instdisc(
        "scale",
        "data",
        "--sizes",
        600,
        "--steps",
        3,
        "--test-images",
        100,
        "--output-dir",
        tmp_path,
        "train.batch_size=32",
        *TINY_RUN[1:],
        timeout=900,
        statuses=(0, 1),  # 1: a target missed, on a machine this busy
    )
    rows = pq.read_table(tmp_path / "results.parquet").to_pylist()
    assert [r["point"] for r in rows] == ["stream-600", "in-memory-600"]
    for r in rows:
        assert r["error"] is None and r["images_per_sec"] > 0 and r["steps"] == 3
        assert 0 < r["worker_pss_bytes"] <= r["train_workers_pss_bytes"] and r["bank_pss_bytes"] > 0
    markdown = (tmp_path / "results.md").read_text()
    assert "Streaming as fast as in memory (600 images): " in markdown  # a second size would check memory vs N
    assert (done.returncode == 1) == ("FAIL" in markdown)
    assert (tmp_path / "memory_vs_images.png").exists() and (tmp_path / "images_per_sec_vs_images.png").exists()


def test_a_benchmark_s_options_are_there_when_its_command_runs_and_the_makefile_s_parse():
    """(That instdisc imports no benchmark for its other commands: tests/test_layering.py.)"""
    for argv in (
        ["bench", "bank", "--rows", "1e6", "--json", "x.json"],
        ["bench", "train", "--bank-cores", "1", "--json", "x.json"],
        ["bench", "bank", "--iters", "500", "--json", "x.json"],
        [
            "bench",
            "train",
            "--device",
            "cuda",
            "--arch",
            "resnet18",
            "--image-size",
            "32",
            "--batch",
            "256",
            "--steps",
            "200",
            "--warmup",
            "20",
            "--json",
            "x.json",
        ],
    ):
        assert build_parser(argv).parse_args(argv).json_path == "x.json"


def test_scale_bank_sweeps_one_axis_at_a_time_around_the_base():
    settings = {
        "rows": [10**4, 10**6, 10**8],
        "shards": [1, 2, 4],
        "negatives": [256, 4096, 65536],
        "dtypes": ["float16", "float32"],
        "clients": [1, 2, 4],
    }
    banks, base = plan(settings)
    assert base == (10**6, 2, "float16", 4096, 1)
    # N x S, plus two more K, one more dtype and two more client counts at the base.
    assert sum(map(len, banks.values())) == 9 + 2 + 1 + 2 and len(banks) == 9 + 1
    assert banks[(10**6, 2, "float16")] == [(256, 1), (4096, 1), (4096, 2), (4096, 4), (65536, 1)]


def test_scale_train_shares_points_between_sweeps_and_clamps_subsets():
    grid = Grid(
        negatives=(16, SOFTMAX),
        fixed_subset=20000,
        subsets=(20000, 60000, 70000),
        fixed_negatives=16,
        epochs=2,
        infonce_negatives=(256,),
    )
    assert plan_points(grid, train_rows=60000) == {
        TrainPoint(16, 20000, 2): ["negatives", "bank size"],
        TrainPoint(None, 20000, 2): ["negatives"],
        TrainPoint(256, 20000, 2, "infonce"): ["negatives"],
        TrainPoint(16, 60000, 2): ["bank size"],
    }
    assert TrainPoint(16, 60000, 2).overrides(60000) == [
        "loss.kind=nce",
        "data.subset=0",
        "train.epochs=2",
        "loss.negatives=16",
    ]


def test_the_bank_cores_are_the_first_and_training_keeps_at_least_one():
    assert split_cores([0, 1, 2, 3], 1) == ({0}, {1, 2, 3})
    assert split_cores([2, 5, 7], 2) == ({2, 5}, {7})
    for bad in (-1, 3):
        with pytest.raises(SystemExit, match=r"--bank-cores must be in \[0, 2\]"):
            split_cores([2, 5, 7], bad)


def test_scale_data_checks_memory_against_n_and_streaming_against_memory():
    def row(point, images, worker_mb, per_sec, error=None):
        return dict(point=point, images=images, worker_pss_bytes=worker_mb * 1e6, images_per_sec=per_sec, error=error)

    rows = [
        row("stream-1000", 1000, 700, 950),
        row("in-memory-1000", 1000, 650, 1000),
        row("stream-9000", 9000, 800, 9),
    ]
    flat, fast = checks(rows)
    assert "700 MB at 1,000: ratio 1.14 (target <= 1.2) PASS" in flat and "ratio 0.95 (target >= 0.9) PASS" in fast
    rows[2]["worker_pss_bytes"], rows[0]["images_per_sec"] = 900e6, 800
    assert all("FAIL" in line for line in checks(rows))
    rows[1]["error"] = "exit status 1"
    assert "not measured" in checks(rows)[1]
