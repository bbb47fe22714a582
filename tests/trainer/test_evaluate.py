"""`instdisc eval knn` and `instdisc eval linear` on an exported encoder, apart from
training, on real Fashion-MNIST."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from trainer import checkpoint
from trainer.cli import main
from trainer.config import load_config
from trainer.data import load_datasets
from trainer.evaluate import evaluate_knn
from trainer.export import export_encoder
from trainer.knn import knn_accuracy
from trainer.models import Encoder

DATA = ["data.subset=2000", "data.test_subset=300"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A checkpoint of a (seeded, untrained) encoder, as a run writes it."""
    folder = tmp_path_factory.mktemp("checkpoint")
    torch.manual_seed(0)
    encoder = Encoder("small", 1, 128, 8, True, mean=[0.29], std=[0.35])
    save_untrained(folder, encoder)
    return folder, encoder.eval()


@pytest.fixture(scope="module")
def rgb_export(tmp_path_factory):
    """A backbone export that takes 3-channel images, which Fashion-MNIST is not."""
    folder = tmp_path_factory.mktemp("rgb")
    save_untrained(folder, Encoder("small", 3, 128, 8, True))
    return export_encoder(folder, folder / "rgb.pt")


def save_untrained(folder, encoder, image_size: int = 28) -> None:
    """A checkpoint of `encoder`, trained on images of side `image_size`, as a run writes it, one step in."""
    checkpoint.save(
        folder,
        model=encoder.state_dict(),
        optimizer={},
        encoder=encoder.spec(),
        image_size=image_size,
        epoch=1,
        step=1,
        epoch_step=1,
        history=[],
        log_z=None,
        bank_snapshot="epoch-0001",
        bank_addresses=[],
        config={},
        git_sha="",
        bank_outages=[],
        dataset={},
    )


def test_knn_of_an_export_with_its_head_scores_the_runs_embeddings(saved, tmp_path, capsys):
    folder, encoder = saved
    path = export_encoder(folder, tmp_path / "encoder.pt", head=True)
    config = load_config(None, DATA)
    result = evaluate_knn(str(path), config)
    # The same figure from the encoder itself, without the export.
    train_set, test_set = load_datasets(config)
    with torch.no_grad():

        def embed(dataset):
            images, _, labels = dataset.__getitems__(list(range(len(dataset))))
            return F.normalize(encoder(images.float() / 255), dim=1), labels

        train, test = embed(train_set), embed(test_set)
    expected = knn_accuracy(*train, *test, 10, config.eval.k, config.eval.sigma)
    assert (result["knn_top1"], result["knn_top5"]) == pytest.approx(expected, abs=1 / 300)
    assert result["features"] == "embedding" and result["train_images"] == 2000 and result["test_images"] == 300
    assert main(["eval", "knn", "--encoder", str(path), *DATA]) == 0
    assert f"{100 * result['knn_top1']:.2f} %" in capsys.readouterr().out


def test_a_backbone_export_is_scored_on_backbone_features(saved, tmp_path):
    path = export_encoder(saved[0], tmp_path / "backbone.pt")
    result = evaluate_knn(str(path), load_config(None, DATA))
    assert result["features"] == "backbone" and 0 < result["knn_top1"] <= result["knn_top5"] <= 1


def test_what_cannot_be_scored_is_refused_naming_why(saved, rgb_export, tmp_path, capsys):
    (tmp_path / "junk.pt").write_bytes(b"not a program")
    foreign = tmp_path / "foreign.pt"
    torch.export.save(torch.export.export(torch.nn.Linear(2, 2), (torch.rand(1, 2),)), str(foreign))
    head = export_encoder(saved[0], tmp_path / "head.pt", head=True)
    unlabelled = tmp_path / "unlabelled"
    unlabelled.mkdir()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(unlabelled / "0.png")
    cases = [
        (["--encoder", str(tmp_path / "junk.pt")], "not a torch.export program"),
        (["--encoder", str(foreign)], "not an instdisc export"),
        (["--encoder", str(tmp_path / "missing.pt")], "no such file"),
        (["--encoder", str(rgb_export)], "3-channel images of 8x8 to 112x112"),
        (["--encoder", str(head), "data.name=imagefolder", f"data.root={unlabelled}"], "needs labelled"),
    ]
    for args, message in cases:
        assert main(["eval", "knn", *args, "data.test_subset=50"]) == 2, args
        assert message in capsys.readouterr().err, args
    assert main(["eval", "knn", "--encoder", str(head), "data.subset=100", "data.test_subset=50"]) == 0
    assert "k, sigma   100, 0.07" in capsys.readouterr().out  # capped as a run caps it
    with open(head, "rb") as fh:
        extra = {"instdisc.json": ""}
        torch.export.load(fh, extra_files=extra)
    assert json.loads(extra["instdisc.json"])["output"] == "embedding"


LINEAR = [*DATA, "eval.linear_epochs=5", "eval.linear_batch_size=256"]


def test_the_linear_probe_reports_writes_linear_json_and_reuses_its_features(saved, tmp_path, capsys):
    from trainer.linear import evaluate_linear

    path = export_encoder(saved[0], tmp_path / "encoder.pt")
    result = evaluate_linear(str(path), load_config(None, LINEAR), tmp_path / "out")
    assert 0.3 < result["linear_top1"] <= result["linear_top5"] <= 1, result  # 10 classes: chance is 0.1
    assert result["features"] == 4 * 8 * 9 and result["train_images"] == 2000 and result["test_images"] == 300
    assert not result["cache_reused"] and (result["epochs"], result["batch_size"]) == (5, 256)
    assert json.loads((tmp_path / "out" / "linear.json").read_text()) == result
    # Cached features are read back, and the same inputs give the same figures.
    assert main(["eval", "linear", "--encoder", str(path), "--output-dir", str(tmp_path / "out"), *LINEAR]) == 0
    out = capsys.readouterr().out
    again = json.loads((tmp_path / "out" / "linear.json").read_text())
    assert again["cache_reused"] and again["feature_cache"] == result["feature_cache"]
    assert (again["linear_top1"], again["linear_top5"]) == (result["linear_top1"], result["linear_top5"])
    assert f"{100 * result['linear_top1']:.2f} %" in out and "linear top-5" in out
    # Other data is another cache entry.
    other = evaluate_linear(str(path), load_config(None, [*LINEAR, "data.test_subset=200"]), tmp_path / "out")
    assert not other["cache_reused"] and other["test_images"] == 200


def test_what_the_linear_probe_cannot_take_is_refused_naming_why(saved, rgb_export, tmp_path, capsys):
    head = export_encoder(saved[0], tmp_path / "head.pt", head=True)
    (tmp_path / "junk.pt").write_bytes(b"not a program")
    cases = [
        (tmp_path / "junk.pt", "not a torch.export program"),
        (tmp_path / "missing.pt", "no such file"),
        (rgb_export, "3-channel"),
        (head, "--head"),
    ]
    for encoder, message in cases:
        assert (
            main(["eval", "linear", "--encoder", str(encoder), "--output-dir", str(tmp_path / "out"), *LINEAR]) == 2
        ), encoder
        assert message in capsys.readouterr().err, encoder
    assert not (tmp_path / "out" / "linear.json").exists()


def test_an_evaluation_split_missing_a_class_scores_as_the_whole_one(tmp_path):
    # Each ImageFolder split once numbered its own classes: a val/ without class 0 shifted
    # every other class by one, and kNN collapsed.
    fashion, _ = load_datasets(load_config(None, ["data.subset=600"]))
    for i, (image, _, label) in enumerate(fashion):
        if label < 4:
            split = "train" if i < 480 else "val"
            folder = tmp_path / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image[0].numpy()).save(folder / f"{i}.png")
    torch.manual_seed(0)
    encoder = Encoder("small", 3, 32, 8, True, mean=[0.29] * 3, std=[0.35] * 3)
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    save_untrained(folder, encoder)
    path = str(export_encoder(folder, tmp_path / "encoder.pt", head=True))
    data = ["data.name=imagefolder", f"data.root={tmp_path}", "data.image_size=28", "eval.k=20"]
    whole = evaluate_knn(path, load_config(None, data))["knn_top1"]
    for image in (tmp_path / "val" / "class0").iterdir():
        image.unlink()
    (tmp_path / "val" / "class0").rmdir()
    lacking = evaluate_knn(path, load_config(None, data))["knn_top1"]
    assert whole > 0.5 and abs(whole - lacking) < 0.1, (whole, lacking)
