"""End to end on Fashion-MNIST: `instdisc train` on a local Ray with 2 bank shard
actors and 2 CPU workers, a resume of the same run, the runs that stop, and the long
accuracy check (running shard servers: tests/bank_server/test_ray_cluster.py).

The runs share one local Ray, started here in the test process (each `instdisc train`
joins it, as under `ray job submit`), and are checked by what they write: summary.json,
metrics.csv, TensorBoard events, the bank's snapshots, return codes."""

import csv
import json
import math
import time

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.cli import main

# Behaviour, not accuracy: a small subset keeps each run to about the cost of starting it.
SUBSET = [
    "data.subset=2048",
    "data.test_subset=500",
    "train.batch_size=128",
    "train.workers=2",
    "bank.shards=2",
    "train.log_every=5",
    "loss.negatives=256",
]


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    import ray

    from trainer.launch import init_ray

    init_ray()
    yield
    ray.shutdown()


def train(output, *overrides, name="e2e") -> int:
    where = ["--output-dir", str(output)] if output else []  # None: a new folder runs/<start time>
    return main(["train", *where, "--name", name, *SUBSET, *overrides])


def summary_of(output) -> dict:
    return json.loads((output / "summary.json").read_text())


def rows_of(output) -> list[dict]:
    return list(csv.DictReader(open(output / "metrics.csv")))


# Bookkeeping at steps of their own: a refresh at the first epoch's end (16 steps), kNN
# mid-way through the second and at the end.
FIRST = ["train.epochs=2", "eval.every=24", "train.refresh_bank_every=16"]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """Run without --output-dir, from a folder of its own: its outputs go to a new run folder."""
    where = tmp_path_factory.mktemp("cwd")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(where)
        assert train(None, *FIRST) == 0
    (output,) = (where / "runs").iterdir()
    return output


def test_training_writes_every_output(first_run):
    output = first_run
    summary = summary_of(output)
    assert (summary["epochs"], summary["steps"]) == (2, 32)  # 2,048 images in batches of 128
    assert summary["images_per_sec"] > 0 and summary["train_seconds"] > 0 and summary["knn_source"] == "bank"
    assert 0 < summary["knn_top1"] <= summary["knn_top5"] <= 1 and 0 < summary["knn_top1_untrained"] <= 1
    assert (summary["knn_epoch"], summary["knn_step"]) == (2, 32) and summary["eval_seconds"] > 0
    assert summary["refresh_seconds"] > 0
    assert isinstance(summary["warnings"], list)
    rows = rows_of(output)
    # A row at each pause: the untrained encoder, the epoch's end, an evaluation, the end.
    assert [float(r["epoch"]) for r in rows] == [0, 1, 1.5, 2] and [int(r["step"]) for r in rows] == [0, 16, 24, 32]
    assert all(np.isfinite(float(r["loss"])) for r in rows[1:])
    assert math.isnan(float(rows[1]["knn_top1"])) and float(rows[3]["knn_top1"]) == summary["knn_top1"]
    assert np.isfinite(float(rows[2]["knn_top1"]))  # eval.every=24
    refreshed = [r["step"] for r in rows if np.isfinite(float(r["refresh_seconds"]))]
    assert refreshed == ["0", "16", "32"]  # the warm start, then train.refresh_bank_every=16
    # TensorBoard: the progress lines' scalars per step, and each epoch's (written as it went).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(output / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/images_per_sec", "train/bank_rtt_ms", "knn/top1", "knn/top5"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == [5, 10, 15, 20, 25, 30]  # log_every=5 over the run
    assert [e.step for e in events.Scalars("knn/top1")] == [0, 24, 32]
    assert events.Scalars("knn/top1")[-1].value == pytest.approx(summary["knn_top1"])
    assert (output / "curves.png").stat().st_size > 10_000
    with open(output / "encoder.pt", "rb") as fh:
        encoder = torch.export.load(fh).module()
    assert encoder(torch.rand(5, 1, 28, 28)).shape == (5, 128 * 9)  # backbone features, head dropped
    assert (output / "checkpoint" / "state.pt").exists()


def test_neighbours_of_test_images_come_from_the_runs_last_bank_snapshot(first_run, tmp_path):
    # The run drew its own picture while its bank served; this one serves the bank again
    # from the run's snapshots, in shard processes of its own.
    assert (first_run / "neighbors.png").stat().st_size > 10_000
    picture = tmp_path / "pictures" / "four.png"
    assert main(["neighbors", "--run", str(first_run), "--test", "4", "-k", "5", "--output", str(picture)]) == 0
    assert picture.stat().st_size > 10_000
    found = json.loads(picture.with_suffix(".json").read_text())
    queries = found["queries"]
    assert found["k"] == 5 and [q["source"] for q in queries] == ["test[0]", "test[125]", "test[250]", "test[375]"]
    for query in queries:
        assert len(query["rows"]) == len(set(query["rows"])) == 5 and all(0 <= r < 2048 for r in query["rows"])
        sims = query["similarities"]
        assert all(-1 <= s <= 1 for s in sims) and sims == sorted(sims, reverse=True)
        assert 0 <= query["label"] < 10 and len(query["labels"]) == 5
    same = sum(label == q["label"] for q in queries for label in q["labels"])
    assert same >= 10, queries  # of 20: trained features put like images together
    assert sorted(p.name for p in (first_run / "bank" / "e2e").iterdir()) == ["shard-00000", "shard-00001"]


def test_neighbours_of_a_folder_without_a_checkpoint_are_refused(first_run, tmp_path, capsys):
    (tmp_path / "config.yaml").write_text((first_run / "config.yaml").read_text())
    assert main(["neighbors", "--run", str(tmp_path), "--test", "2"]) == 2
    assert "no state.pt" in capsys.readouterr().err
    assert main(["neighbors", "--run", str(first_run), "--test", "2", "-k", "4096"]) == 2
    assert "-k 4096" in capsys.readouterr().err


def test_a_rerun_on_other_data_is_refused_before_anything_starts(first_run, capsys):
    # How a resume goes on (its step, its bank resharded) is test_resume.py's and the
    # multi-node test's; here, that a rerun of the same name on another dataset (the
    # subset a new seed picks) is refused once, from the files, before Ray or the bank
    # starts, and changes nothing.
    before = (first_run / "summary.json").read_bytes()
    assert train(first_run, "train.epochs=4", "train.seed=1") == 2
    err = capsys.readouterr().err
    assert err.count("another dataset") == 1 and "subset_seed 1" in err, err[-2000:]
    assert (first_run / "summary.json").read_bytes() == before


@pytest.mark.slow
def test_nce_learns_without_collapse(tmp_path):
    # The accuracy check. NCE needs the full bank (K / N small): on 20k images it dips
    # below the untrained encoder for several epochs. On all 60k it recovers within two
    # (79.5 % -> 82.4 % with the half-width encoder, which halves the test's time).
    # The bank refreshed from clean images after every epoch (468 steps) is part of this
    # recipe.
    assert (
        train(
            tmp_path,
            "data.subset=0",
            "data.test_subset=1000",
            "train.epochs=2",
            "loss.kind=nce",
            "train.refresh_bank_every=468",
            "eval.every=936",  # the end only: what is checked
            "loss.negatives=4096",
            "augment.crop_min=0.5",
            "loss.temperature=0.1",
            "train.lr=0.06",
            "train.log_every=50",
            "model.width=16",
            name="nce",
        )
        == 0
    )
    summary = summary_of(tmp_path)
    assert summary["knn_top1"] > summary["knn_top1_untrained"], summary
    rows = rows_of(tmp_path)
    assert [r["step"] for r in rows] == ["0", "468", "936"]
    assert float(rows[2]["loss"]) < float(rows[1]["loss"])


def test_a_non_finite_loss_stops_with_a_message(tmp_path, capsys):
    assert main(["train", "--output-dir", str(tmp_path), *SUBSET, "train.lr=1e30", "train.epochs=1"]) == 1
    err = capsys.readouterr().err
    assert "non-finite" in err and "checkpoint" in err, err[-2000:]
    assert not (tmp_path / "summary.json").exists()  # stopped in its first epoch: nothing to write up


def test_config_and_data_errors_are_reported(tmp_path, capsys):
    cases = [
        (["model.arch=resnet18", "model.cifar_stem=false"], "32x32"),
        (["data.name=parquet", f"data.root={tmp_path}"], "train.parquet"),
        (["train.epoch=1"], "'train.epoch'"),
        (["bank.addresses=127.0.0.1:1"], "UNAVAILABLE"),
        (["bank.addresses=localhost"], "host:port"),
    ]
    for overrides, word in cases:  # each is refused before training starts
        assert main(["train", "--output-dir", str(tmp_path / "x"), *SUBSET, "bank.timeout=2", *overrides]) == 2
        assert word in capsys.readouterr().err, overrides


def test_a_token_the_bank_refuses_stops_the_run_naming_the_shard(tmp_path, spawn_server, capsys):
    (tmp_path / "token").write_text("right\n")
    (tmp_path / "wrong").write_text("wrong\n")
    server = spawn_server(
        "--shard-id", "0", "--num-shards", "1", "--rows", "2048", "--port", "0", "--token-file", str(tmp_path / "token")
    )
    server.wait_serving()
    assert (
        main(
            [
                "train",
                "--output-dir",
                str(tmp_path / "out"),
                *SUBSET,
                f"bank.addresses={server.address}",
                f"bank.token_file={tmp_path / 'wrong'}",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert server.address in err and "UNAUTHENTICATED" in err and "bank.token_file" in err, err[-2000:]


# Your own images. SUBSET's sizes are overridden: these sets are tiny.
OWN = [
    "data.image_size=16",
    "train.batch_size=16",
    "train.steps=2",
    "bank.shards=1",
    "model.width=8",
    "loss.negatives=32",
    "eval.k=5",
]


def test_unclassified_images_with_a_corrupt_one_stop_naming_it_or_train_skipping_it(first_run, tmp_path, capsys):
    # Past the first 512 images (the normalisation statistics'), so that the warm start
    # meets it, on one of the 2 workers while the other waits for it.
    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(520):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(images / f"{i:03d}.jpg")
    bad = images / "zz-truncated.jpg"
    bad.write_bytes((images / "000.jpg").read_bytes()[:200])
    root = ["data.name=imagefolder", f"data.root={images}"]
    started = time.perf_counter()
    assert train(tmp_path / "fail", *OWN, *root, name="bad") == 1
    assert str(bad) in capsys.readouterr().err.strip().splitlines()[-1]
    assert time.perf_counter() - started < 90  # no Ray retry, no worker left waiting
    # Skipping it, without --output-dir, under first_run's name and from its working
    # folder: a fixed default folder would have tried to resume first_run on this data.
    before = summary_of(first_run)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(first_run.parent.parent)
        assert train(None, *OWN, *root, "data.on_bad_image=skip", "eval.linear=true") == 0
    (second,) = set(first_run.parent.iterdir()) - {first_run}
    assert summary_of(first_run) == before
    summary = summary_of(second)
    assert summary["evaluated"] == [] and "no evaluation split" in summary["evaluation_skipped"]
    assert summary["bad_images_skipped"] == 1 and summary["knn_top1"] is None
    assert "on_bad_image: skip" in (second / "config.yaml").read_text()
