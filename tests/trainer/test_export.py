"""`instdisc export` for downstream use: the torchvision format in torchvision's own
ResNet, the program at sides other than the training side, and `instdisc eval` on both."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

from tests.trainer.test_evaluate import save_untrained
from trainer.cli import main
from trainer.export import load_export
from trainer.models import Encoder

SIDE = 32
README = Path(__file__).resolve().parents[2] / "README.md"
SNIPPET_MARKER = "<!-- tested: tests/trainer/test_export.py -->"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(checkpoint folder, encoder): a resnet18 a few SGD steps into training on random
    32x32 images, saved as a run saves it."""
    torch.manual_seed(0)
    encoder = Encoder("resnet18", 3, 128, cifar_stem=False, mean=[0.4, 0.45, 0.5], std=[0.2, 0.25, 0.3])
    optimizer = torch.optim.SGD(encoder.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):  # instance discrimination within the batch: moves weights and batch-norm statistics
        features = encoder(torch.rand(8, 3, SIDE, SIDE))
        loss = F.cross_entropy(features @ features.T / 0.1, torch.arange(8))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    folder = tmp_path_factory.mktemp("resnet18")
    save_untrained(folder, encoder, image_size=SIDE)
    return folder, encoder.eval()


@pytest.fixture(scope="module")
def exported(trained):
    """The trained checkpoint exported with `instdisc export --format torchvision`."""
    path = trained[0] / "resnet.pt"
    assert main(["export", str(trained[0]), str(path), "--format", "torchvision"]) == 0
    return path


def normalised(images: torch.Tensor, saved: dict) -> torch.Tensor:
    return (images - torch.tensor(saved["mean"]).view(1, -1, 1, 1)) / torch.tensor(saved["std"]).view(1, -1, 1, 1)


def test_torchvision_resnet18_loads_the_export_and_gives_the_backbones_features(trained, exported):
    encoder = trained[1]
    saved = torch.load(exported, weights_only=True)
    model = torchvision.models.resnet18(weights=None)
    keys = model.load_state_dict(saved["state_dict"], strict=False)
    assert sorted(keys.missing_keys) == ["fc.bias", "fc.weight"] and keys.unexpected_keys == []
    assert all(t.is_contiguous() for t in saved["state_dict"].values())
    assert (saved["arch"], saved["cifar_stem"], saved["in_channels"], saved["note"]) == ("resnet18", False, 3, "")
    assert saved["mean"] == pytest.approx([0.4, 0.45, 0.5]) and saved["std"] == pytest.approx([0.2, 0.25, 0.3])
    model.fc = torch.nn.Identity()
    model.eval()
    for side in (SIDE, 2 * SIDE):
        images = torch.rand(3, 3, side, side)
        with torch.no_grad():
            torch.testing.assert_close(model(normalised(images, saved)), encoder.features(images), atol=1e-4, rtol=0)


def test_the_program_takes_other_sides_than_the_training_side(trained, tmp_path):
    folder, encoder = trained
    path = tmp_path / "program.pt"
    assert main(["export", str(folder), str(path)]) == 0
    program, metadata = load_export(path)
    assert (metadata["image_size"], metadata["min_image_size"], metadata["max_image_size"]) == (SIDE, 32, 4 * SIDE)
    for height, width in ((2 * SIDE, 2 * SIDE), (SIDE, SIDE + 7)):
        images = torch.rand(2, 3, height, width)
        with torch.no_grad():
            torch.testing.assert_close(program(images), encoder.features(images), atol=1e-4, rtol=0)


def readme_snippet() -> str:
    """The README's ```python block right after the marker."""
    text = README.read_text()
    assert SNIPPET_MARKER in text
    return re.search(r"```python\n(.*?)```", text[text.index(SNIPPET_MARKER) :], re.S).group(1)


def test_the_readme_snippet_runs_the_export_in_torchvision_at_another_side(trained, exported, monkeypatch):
    encoder = trained[1]
    snippet = readme_snippet()
    assert f'"{exported.name}"' in snippet
    monkeypatch.chdir(exported.parent)
    names = {}
    exec(compile(snippet, str(README), "exec"), names)
    images, features = names["images"], names["features"]
    assert images.shape[-1] != SIDE
    with torch.no_grad():
        torch.testing.assert_close(features, encoder.features(images), atol=1e-4, rtol=0)


def test_what_has_no_torchvision_form_is_refused_in_one_line(trained, tmp_path, capsys):
    small = tmp_path / "small"
    small.mkdir()
    save_untrained(small, Encoder("small", 1, 128, 8, True))
    cases = [
        ([str(small), "--format", "torchvision"], "model.arch=small"),
        ([str(trained[0]), "--format", "torchvision", "--head"], "--head"),
    ]
    for args, message in cases:
        assert main(["export", *args[:1], str(tmp_path / "out.pt"), *args[1:]]) == 2, args
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out.pt").exists()


def test_a_cifar_stem_one_channel_export_says_how_torchvision_builds_it(tmp_path, capsys):
    save_untrained(tmp_path, Encoder("resnet18", 1, 128, cifar_stem=True, mean=[0.29], std=[0.35]))
    path = tmp_path / "cifar-stem.pt"
    assert main(["export", str(tmp_path), str(path), "--format", "torchvision"]) == 0
    out = capsys.readouterr().out
    saved = torch.load(path, weights_only=True)
    assert "CIFAR stem" in saved["note"] and "1 input channel" in saved["note"] and saved["note"] in out
    # The note's own lines make torchvision's model take the weights.
    model = torchvision.models.resnet18(weights=None)
    exec(saved["note"].split("before load_state_dict set ", 1)[1], {"torch": torch, "model": model})
    keys = model.load_state_dict(saved["state_dict"], strict=False)
    assert sorted(keys.missing_keys) == ["fc.bias", "fc.weight"] and keys.unexpected_keys == []


def write_tinted_images(root: Path, per_class: dict[str, int]) -> None:
    """An ImageFolder of 32x32 noise, each class tinted in its own channel: a backbone's
    features tell the classes apart, trained or not."""
    generator = np.random.default_rng(0)
    for split, count in per_class.items():
        for label in range(3):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = generator.integers(0, 128, (SIDE, SIDE, 3), dtype=np.uint8)
                pixels[..., label] += 127
                Image.fromarray(pixels).save(folder / f"{i}.png")


def test_eval_knn_scores_a_torchvision_format_export(exported, tmp_path, capsys):
    write_tinted_images(tmp_path / "images", {"train": 70, "test": 35})
    data = ["data.name=imagefolder", f"data.root={tmp_path / 'images'}", "data.subset=200", "data.test_subset=100"]
    assert main(["eval", "knn", "--encoder", str(exported), *data]) == 0
    out = capsys.readouterr().out
    assert re.search(r"features\s+backbone", out) and "200 train, 100 test" in out
    top1 = float(re.search(r"kNN top-1\s+([\d.]+) %", out).group(1))
    assert top1 > 60  # 3 classes: chance is 33 %
