"""`instdisc scale train --quick` on real Fashion-MNIST with a local Ray, on 1,000
images: one-epoch runs of NCE (K = 16, on both sweeps) and the exact softmax, then a
rerun that reads every point back instead of training it again."""

import math
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from PIL import Image

from trainer.cli import main
from benchmarks.scale_train import SOFTMAX, Grid, TrainPoint, plan_points, result_row, write_results

# --quick's grid on fewer images: the point is the sweep's behaviour, not its accuracy.
QUICK = ["--quick", "--fixed-subset", "1000", "--subsets", "1000"]
POINTS = ["nce-k16-rows1000-e1", "softmax-rows1000-e1"]
COLUMNS = {"point", "sweeps", "loss", "negatives", "bank_rows", "epochs", "knn_top1", "knn_top5", "knn_top1_untrained",
           "knn_top1_gain", "images_per_sec", "train_seconds", "final_loss", "error"}


def scale_train(output, *args, timeout=600):
    return subprocess.run([sys.executable, "-m", "trainer.cli", "scale", "train", "--output-dir", str(output), *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    output = tmp_path_factory.mktemp("scale-train")
    done = scale_train(output, *QUICK)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return output, done.stdout + done.stderr


def test_sweep_writes_a_row_per_point_the_table_and_the_plots(sweep):
    output, console = sweep
    rows = pq.read_table(output / "results.parquet").to_pylist()
    assert [r["point"] for r in rows] == POINTS
    assert COLUMNS <= set(rows[0])
    for row in rows:
        assert row["error"] is None and row["epochs"] == 1
        assert 0 < row["knn_top1"] <= row["knn_top5"] <= 1, row
        assert 0 < row["knn_top1_untrained"] <= 1
        assert math.isclose(row["knn_top1_gain"], row["knn_top1"] - row["knn_top1_untrained"])
        assert row["images_per_sec"] > 0 and row["train_seconds"] > 0 and math.isfinite(row["final_loss"])
    assert [(r["loss"], r["negatives"], r["bank_rows"]) for r in rows] == [("nce", 16, 1000), ("softmax", None, 1000)]
    assert [r["sweeps"] for r in rows] == ["negatives+bank size", "negatives"]

    markdown = (output / "results.md").read_text()
    assert markdown.startswith("# kNN accuracy vs negatives and bank size (fashion-mnist)")
    assert all(f"| {name} |" in markdown for name in POINTS)
    for name in ("knn_vs_negatives.png", "knn_vs_bank_size.png"):
        with Image.open(output / name) as image:
            assert image.format == "PNG" and image.width > 300 and image.height > 200

    # Each run's own output went to its log, not the sweep's console.
    assert "resolved config" not in console and "untrained encoder: kNN" not in console
    assert "untrained encoder: kNN" in (output / "points" / POINTS[0] / "log.txt").read_text()
    assert (output / "points" / POINTS[0] / "summary.json").exists()


def test_rerunning_reads_finished_points_back(sweep):
    output, _ = sweep
    logs = {name: (output / "points" / name / "log.txt").read_text() for name in POINTS}
    done = scale_train(output, *QUICK, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("(reused)") == 2
    assert "2 of 2 point(s) were read back" in (output / "results.md").read_text()
    assert {name: (output / "points" / name / "log.txt").read_text() for name in POINTS} == logs


def test_a_sweep_that_cannot_run_as_asked_is_refused_before_training(sweep, tmp_path, capsys):
    output, _ = sweep
    cases = [
        (tmp_path, [*QUICK, "loss.negatives=8"], "loss.negatives is set by the sweep"),
        (tmp_path, [*QUICK, "--negatives", "4,5000"], "K = 5000 negatives exceeds the 1000 training images"),
        (tmp_path, [*QUICK, "--negatives", "", "--subsets", ""], "nothing to run"),
        (output, [*QUICK, "train.lr=0.01"], "was trained with another config"),
    ]
    for folder, args, message in cases:
        assert main(["scale", "train", "--output-dir", str(folder), *args]) == 2, args
        assert message in capsys.readouterr().err, args
    assert not list(tmp_path.iterdir())


def test_a_failed_point_is_a_row_with_its_error(tmp_path):
    done = {"knn_top1": 0.8, "knn_top5": 0.99, "knn_top1_untrained": 0.75, "images_per_sec": 900.0,
            "train_seconds": 20.0, "wall_seconds": 30.0, "final_loss": 5.0, "steps": 150}
    rows = [result_row(TrainPoint(16, 2000, 1), ["negatives"], done),
            result_row(TrainPoint(None, 2000, 1), ["negatives"], None, error="the loss became non-finite")]
    assert rows[0]["knn_top1_gain"] == pytest.approx(0.05) and rows[1]["knn_top1"] is None
    paths = write_results(rows, tmp_path, "fashion-mnist", notes=["a note"])
    assert [p.name for p in paths] == ["results.parquet", "results.md", "knn_vs_negatives.png"]
    assert "| the loss became non-finite |" in (tmp_path / "results.md").read_text()
    assert pq.read_table(paths[0]).column("error").to_pylist() == [None, "the loss became non-finite"]


def test_the_plan_shares_points_and_clamps_subsets_to_the_dataset():
    grid = Grid(negatives=(16, SOFTMAX), fixed_subset=20000, subsets=(20000, 60000, 70000), fixed_negatives=16,
                epochs=2)
    plan = plan_points(grid, train_rows=60000)
    assert plan == {TrainPoint(16, 20000, 2): ["negatives", "bank size"], TrainPoint(None, 20000, 2): ["negatives"],
                    TrainPoint(16, 60000, 2): ["bank size"]}
    assert TrainPoint(16, 60000, 2).overrides(60000) == [
        "loss.kind=nce", "loss.negatives=16", "data.subset=0", "train.epochs=2"]


def test_infonce_points_sit_beside_nce_and_the_softmax_on_the_negatives_sweep():
    grid = Grid(negatives=(256, SOFTMAX), fixed_subset=60000, subsets=(), fixed_negatives=256, epochs=3,
                infonce_negatives=(256, 4096, 16384))
    plan = plan_points(grid, train_rows=60000)
    assert [p.name for p in plan] == ["nce-k256-rows60000-e3", "softmax-rows60000-e3", "infonce-k256-rows60000-e3",
                                      "infonce-k4096-rows60000-e3", "infonce-k16384-rows60000-e3"]
    assert set(map(tuple, plan.values())) == {("negatives",)}
    assert TrainPoint(16384, 60000, 3, "infonce").overrides(60000) == [
        "loss.kind=infonce", "loss.negatives=16384", "data.subset=0", "train.epochs=3"]
    assert TrainPoint(16384, 60000, 3, "infonce").loss == "infonce"
