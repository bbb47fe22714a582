"""End to end on a Fashion-MNIST subset: `instdisc train` on a local Ray with 2 bank
shard actors and 2 CPU workers, then a resume of the same run."""

import csv
import json
import subprocess
import sys

import pytest
import torch

SUBSET = [
    "data.subset=2048", "data.test_subset=1000", "train.batch_size=64", "train.workers=2", "bank.shards=2",
    "train.log_every=8", "model.width=16", "eval.k=50",
]


def train(output, *overrides, name="e2e"):
    done = subprocess.run([sys.executable, "-m", "trainer", "train", "--output-dir", str(output), "--name", name,
                           *SUBSET, *overrides], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("run")
    logs = train(output, "train.epochs=3", "loss.kind=softmax", "train.lr=0.1")
    return output, logs


def test_training_learns_and_writes_every_output(first_run):
    output, logs = first_run
    assert "resolved config" in logs and "img/s" in logs and "bank rtt" in logs and "ETA" in logs
    summary = json.loads((output / "summary.json").read_text())
    assert summary["epochs"] == 3 and summary["images_per_sec"] > 0 and summary["train_seconds"] > 0
    assert summary["knn_top1"] > summary["knn_top1_untrained"], summary
    assert 0 < summary["knn_top1"] <= summary["knn_top5"] <= 1
    rows = list(csv.DictReader(open(output / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3]
    losses = [float(r["loss"]) for r in rows[1:]]
    assert losses[-1] < losses[0], losses
    assert (output / "curves.png").stat().st_size > 10_000
    encoder = torch.export.load(str(output / "encoder.pt")).module()
    assert encoder(torch.rand(5, 1, 28, 28)).shape == (5, 64)  # backbone features, head dropped
    assert (output / "checkpoint" / "state.pt").exists()


def test_rerunning_the_same_run_resumes_it(first_run):
    output, _ = first_run
    before = json.loads((output / "summary.json").read_text())
    logs = train(output, "train.epochs=4", "loss.kind=softmax", "train.lr=0.1")
    steps_per_epoch = before["steps"] // 3
    assert f"resumed at epoch 3, step {before['steps']}" in logs
    assert f"epoch-0003-step-{before['steps']}" in logs
    after = json.loads((output / "summary.json").read_text())
    assert after["epochs"] == 4 and after["steps"] == before["steps"] + steps_per_epoch
    rows = list(csv.DictReader(open(output / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3, 4]


def test_nce_learns(tmp_path):
    train(tmp_path, "train.epochs=2", "loss.kind=nce", "loss.negatives=512", name="nce")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["knn_top1"] > summary["knn_top1_untrained"], summary


def test_config_and_data_errors_are_reported(tmp_path):
    cases = [
        (["loss.negatives=5000"], "loss.negatives=5000 exceeds the 2048 training images"),
        (["model.arch=resnet18", "model.cifar_stem=false"], "needs images of at least 32x32"),
        (["data.name=parquet", f"data.root={tmp_path}"], "train.parquet"),
        (["train.epoch=1"], "unknown config key 'train.epoch'"),
        (["bank.addresses=127.0.0.1:1"], "cannot use bank shard 127.0.0.1:1: UNAVAILABLE"),
    ]
    for overrides, message in cases:
        done = subprocess.run([sys.executable, "-m", "trainer", "train", "--output-dir", str(tmp_path / "x"),
                               *SUBSET, "bank.timeout=2", *overrides], capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, (overrides, done.stdout[-2000:], done.stderr[-2000:])
        assert message in done.stderr, (overrides, done.stderr[-2000:])
