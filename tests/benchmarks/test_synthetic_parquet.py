"""The synthetic Parquet image set: Hugging Face's layout, row counts and row groups,
PNGs that decode, classes a nearest-centroid tells apart, the same bytes from the same
seed whatever the processes, and a second run that finds the set and writes nothing."""

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from benchmarks.synthetic_parquet import CLASSES, MANIFEST, Spec, generate, main

SPEC = Spec(images=2500, test_images=300, rows_per_file=1000, rows_per_group=400)
TRAIN = ["train-00000-of-00003.parquet", "train-00001-of-00003.parquet", "train-00002-of-00003.parquet"]
TEST = ["test-00000-of-00001.parquet"]


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    generate(root, SPEC, workers=2, log=quiet)
    return root


def read(root, names):
    tables = [pq.read_table(root / "data" / name) for name in names]
    images = [row["bytes"] for t in tables for row in t.column("image").to_pylist()]
    labels = np.concatenate([t.column("label").to_numpy() for t in tables])
    return images, labels


def pixels(images):
    return np.stack([np.asarray(Image.open(io.BytesIO(data))) for data in images]).astype(np.float32)


def test_files_rows_and_row_groups_in_the_hugging_face_layout(dataset):
    assert sorted(p.name for p in (dataset / "data").iterdir()) == sorted(TEST + TRAIN)
    rows = [pq.ParquetFile(dataset / "data" / name).metadata for name in TRAIN]
    assert [m.num_rows for m in rows] == [1000, 1000, 500]
    assert [[m.row_group(g).num_rows for g in range(m.num_row_groups)] for m in rows] == [
        [400, 400, 200], [400, 400, 200], [400, 100]]
    assert pq.ParquetFile(dataset / "data" / TEST[0]).metadata.num_rows == 300
    schema = pq.read_schema(dataset / "data" / TRAIN[0])
    assert str(schema.field("image").type) == "struct<bytes: binary, path: string>"
    assert str(schema.field("label").type) == "int64"
    features = json.loads(schema.metadata[b"huggingface"])["info"]["features"]
    assert features["image"] == {"_type": "Image"} and features["label"]["names"] == list(CLASSES)
    manifest = json.loads((dataset / MANIFEST).read_text())
    assert manifest["spec"]["images"] == 2500 and set(manifest["files"]) == set(TRAIN + TEST)


def test_every_image_is_a_16x16_grayscale_png_with_a_label_of_ten(dataset):
    images, labels = read(dataset, TRAIN)
    assert len(images) == 2500 and all(data.startswith(b"\x89PNG\r\n\x1a\n") for data in images)
    for data in images[:50]:
        image = Image.open(io.BytesIO(data))
        image.load()  # checks the chunks' CRCs and the zlib stream
        assert image.mode == "L" and image.size == (16, 16)
    assert labels.min() >= 0 and labels.max() == len(CLASSES) - 1
    assert np.bincount(labels).min() > 150  # every class, roughly evenly


def test_the_classes_can_be_told_apart(dataset):
    """A 10-NN on raw pixels (cosine, each image centred) already beats chance (10 %)
    by far on held-out images; the shapes' jitter and noise leave an encoder more to learn."""
    train_images, train_labels = read(dataset, TRAIN)
    test_images, test_labels = read(dataset, TEST)

    def unit(x):
        x = x.reshape(len(x), -1)
        x = x - x.mean(1, keepdims=True)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    similar = unit(pixels(test_images)) @ unit(pixels(train_images)).T
    neighbours = train_labels[np.argsort(-similar, axis=1)[:, :10]]
    predicted = np.array([np.bincount(row, minlength=len(CLASSES)).argmax() for row in neighbours])
    assert (predicted == test_labels).mean() > 0.6


def test_the_same_seed_writes_the_same_bytes_in_one_process_or_two(dataset, tmp_path):
    generate(tmp_path / "again", SPEC, workers=1, log=quiet)
    for name in TRAIN + TEST:
        assert (tmp_path / "again" / "data" / name).read_bytes() == (dataset / "data" / name).read_bytes()
    other = Spec(**{**SPEC.__dict__, "seed": 1, "images": 1000, "test_images": 10})
    generate(tmp_path / "other", other, workers=1, log=quiet)
    assert read(tmp_path / "other", ["train-00000-of-00001.parquet"])[0] != read(dataset, [TRAIN[0]])[0]


def test_a_complete_set_is_kept_and_a_changed_one_rewritten(tmp_path):
    small = Spec(images=900, test_images=50, rows_per_file=400, rows_per_group=200)
    said = []
    generate(tmp_path, small, workers=1, log=said.append)
    first = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "data").iterdir()}
    generate(tmp_path, small, workers=1, log=said.append)
    assert "nothing written" in said[-1]
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "data").iterdir()} == first

    (tmp_path / "data" / "train-00001-of-00003.parquet").write_bytes(b"torn")  # a damaged file: written again
    generate(tmp_path, small, workers=1, log=said.append)
    assert "wrote" in said[-1]
    assert pq.ParquetFile(tmp_path / "data" / "train-00001-of-00003.parquet").metadata.num_rows == 400

    # Another size: the old size's files would join the split's glob, so they go.
    generate(tmp_path, Spec(images=300, test_images=50, rows_per_file=400, rows_per_group=200), workers=1, log=quiet)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["test-00000-of-00001.parquet",
                                                                       "train-00000-of-00001.parquet"]


def test_the_command_line(tmp_path, capsys):
    assert main(["--images", "120", "--test-images", "30", "--output", str(tmp_path), "--workers", "1"]) == 0
    assert "wrote 150 images in 2 files" in capsys.readouterr().out
    assert pq.ParquetFile(tmp_path / "data" / "train-00000-of-00001.parquet").metadata.num_rows == 120
