"""Datasets: the real Fashion-MNIST files, and every on-disk layout with images generated here.

Only the first test needs Fashion-MNIST (`make data` puts it in place); the format tests
write their own small images, so they run on any machine.
"""

import gzip
import io
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from trainer import fetch_data
from trainer.config import ConfigError, load_config
from trainer.data import load_dataset, load_splits
from trainer.folders import UnknownClass
from trainer.images import NO_LABEL, BadImage, BadImages, DataError, DatasetMissing, seeded_subset, why_unevaluated
from trainer.input import describe, open_input

SIZE = 16  # image_size the decoded layouts are loaded at
# (height, width): one already at SIZE (its PNG pixels must come back unchanged), one wide, one tall.
SHAPES = [(SIZE, SIZE), (20, 33), (41, 17)]
MODES = ["L", "RGB"]
FORMATS = ["PNG", "JPEG"]
CLASSES = 3


class Sample:
    def __init__(self, pixels: np.ndarray, fmt: str, label: int):
        self.pixels, self.format, self.label = pixels, fmt, label

    def encoded(self) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(self.pixels).save(buffer, format=self.format)
        return buffer.getvalue()

    def exact(self) -> torch.Tensor | None:
        """What the loader must return pixel for pixel: known only for a lossless image already at SIZE."""
        if self.format != "PNG" or self.pixels.shape[:2] != (SIZE, SIZE):
            return None
        t = torch.from_numpy(self.pixels)
        return t.expand(3, SIZE, SIZE) if t.ndim == 2 else t.permute(2, 0, 1)


@pytest.fixture
def samples() -> list[Sample]:
    """12 random images: every shape x mode x format (lcm of 3, 2, 2), labels cycling 0..CLASSES-1."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(12):
        h, w = SHAPES[i % 3]
        shape = (h, w) if MODES[i % 2] == "L" else (h, w, 3)
        out.append(Sample(rng.integers(0, 256, shape, dtype=np.uint8), FORMATS[(i // 2) % 2], i % CLASSES))
    return out


def check_decoded(ds, expected: list[Sample]):
    """Every item (one by one and as a batch) is uint8 (3, SIZE, SIZE) with the right label (and pixels)."""
    assert len(ds) == len(expected) and ds.num_classes == CLASSES
    for i, sample in enumerate(expected):
        image, index, label = ds[i]
        assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.uint8
        assert index == i and label == sample.label
        if sample.exact() is not None:
            assert torch.equal(image, sample.exact()), i
    images, idx, labels = ds.__getitems__([2, 0, 1])
    assert images.shape == (3, 3, SIZE, SIZE) and images.dtype == torch.uint8
    assert idx.tolist() == [2, 0, 1] and labels.tolist() == [expected[j].label for j in (2, 0, 1)]
    assert torch.equal(images[1], ds[0][0])


def test_fashion_mnist_yields_image_index_label():
    ds = load_dataset("fashion-mnist", download=False)
    assert len(ds) == 60000 and ds.num_classes == 10
    image, index, label = ds[123]
    assert image.shape == (1, 28, 28) and image.dtype == torch.uint8 and index == 123 and 0 <= label < 10
    images, idx, labels = ds.__getitems__([5, 1])
    assert images.shape == (2, 1, 28, 28) and idx.tolist() == [5, 1]
    sub = seeded_subset(ds, 100, seed=0)
    assert len(sub) == 100 and torch.equal(sub.images, seeded_subset(ds, 100, seed=0).images)


def write_parquet(path: Path, samples: list[Sample], hugging_face: bool = False):
    # The Hugging Face layout stores each image as a struct {bytes, path}.
    images = [{"bytes": s.encoded(), "path": None} if hugging_face else s.encoded() for s in samples]
    pq.write_table(pa.table({"image": images, "label": np.array([s.label for s in samples], np.int64)}), path)


@pytest.mark.parametrize("hugging_face", [False, True], ids=["bytes", "hugging-face-struct"])
def test_parquet_tables(tmp_path, samples, hugging_face):
    write_parquet(tmp_path / "train.parquet", samples, hugging_face)
    write_parquet(tmp_path / "test.parquet", samples[: CLASSES + 1], hugging_face)
    check_decoded(load_dataset("parquet", str(tmp_path), train=True, image_size=SIZE), samples)
    check_decoded(load_dataset("parquet", str(tmp_path), train=False, image_size=SIZE), samples[: CLASSES + 1])


def test_a_subset_of_decoded_images_maps_to_the_chosen_rows(tmp_path, samples):
    write_parquet(tmp_path / "train.parquet", samples)
    ds = load_dataset("parquet", str(tmp_path), image_size=SIZE)
    sub = seeded_subset(ds, 5, seed=1)
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(1))[:5].sort().values
    assert len(sub) == 5 and sub.num_classes == CLASSES
    for j, i in enumerate(order.tolist()):
        assert torch.equal(sub[j][0], ds[i][0]) and sub[j][2] == samples[i].label


def test_imagefolder(tmp_path, samples):
    # ImageFolder numbers classes by sorted folder name and lists files sorted within each class.
    names = ["ant", "bee", "cat"]
    for split, part in (("train", samples), ("test", samples[:CLASSES])):
        for i, s in enumerate(part):
            folder = tmp_path / split / names[s.label]
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i:02d}.{s.format.lower()}").write_bytes(s.encoded())
    by_class = sorted(range(len(samples)), key=lambda i: (samples[i].label, i))
    check_decoded(
        load_dataset("imagefolder", str(tmp_path), train=True, image_size=SIZE), [samples[i] for i in by_class]
    )
    check_decoded(load_dataset("imagefolder", str(tmp_path), train=False, image_size=SIZE), samples[:CLASSES])


def write_idx(path: Path, array: np.ndarray):
    """The IDX format: bytes 0, 0, 0x08 (uint8), ndim, each dimension as big-endian uint32, then the data."""
    raw = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    raw += np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


@pytest.fixture
def write_mnist_like():
    """write(folder, gz) -> {train: (images, labels)}: tiny random IDX files named as MNIST names them."""

    def write(folder: Path, gz: bool) -> dict:
        rng = np.random.default_rng(0)
        folder.mkdir(parents=True, exist_ok=True)
        splits = {}
        for train, prefix, n in ((True, "train", 7), (False, "t10k", 5)):
            images = rng.integers(0, 256, (n, 9, 11), dtype=np.uint8)  # not 28x28: nothing assumes it
            labels = rng.integers(0, 10, n, dtype=np.uint8)
            suffix = ".gz" if gz else ""
            write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images)
            write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
            splits[train] = images, labels
        return splits

    return write


@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "plain"])
@pytest.mark.parametrize("layout", ["flat", "torchvision"])
@pytest.mark.parametrize("name", ["fashion-mnist", "mnist"])
def test_idx_files_flat_or_in_torchvisions_download_layout_load_offline(tmp_path, write_mnist_like, name, layout, gz):
    # flat: Debian's package; torchvision: root/FashionMNIST/raw/, as deploy/Dockerfile bakes them in.
    folder = "FashionMNIST" if name == "fashion-mnist" else "MNIST"
    splits = write_mnist_like(tmp_path if layout == "flat" else tmp_path / folder / "raw", gz)
    for train, (images, labels) in splits.items():
        ds = load_dataset(name, str(tmp_path), train=train, download=False)
        assert len(ds) == len(labels) and ds.num_classes == 10
        assert ds.images.dtype == torch.uint8 and ds.images.shape == (len(labels), 1, 9, 11)
        assert torch.equal(ds.images[:, 0], torch.from_numpy(images)) and ds.labels.tolist() == labels.tolist()
        image, index, label = ds[3]
        assert torch.equal(image[0], torch.from_numpy(images[3])) and index == 3 and label == labels[3]


def test_missing_files_say_where_and_how(tmp_path):
    with pytest.raises(DatasetMissing, match="train.parquet"):
        load_dataset("parquet", str(tmp_path))
    with pytest.raises(DatasetMissing, match=f"no images in {tmp_path}"):
        load_dataset("imagefolder", str(tmp_path))
    with pytest.raises(DatasetMissing, match="dataset-fashion-mnist"):
        load_dataset("fashion-mnist", str(tmp_path), download=False)
    with pytest.raises(ValueError, match="data.name must be one of"):
        load_dataset("svhn")


# `make data` (trainer/fetch_data.py): its fetch steps are replaced here, the real ones need
# root or a network; Makefile comments say how to rehearse those.


@pytest.fixture
def steps(monkeypatch):
    """Each fetch step returns what `outcomes` says for it (a reason, or a callable run instead)."""
    outcomes, calls = {}, []

    def step(name):
        def run(*args):
            calls.append(name)
            outcome = outcomes[name]
            return outcome(*args) if callable(outcome) else outcome

        return run

    for name in ("apt_install", "torchvision_download", "unpack_deb"):
        monkeypatch.setattr(fetch_data, name, step(name))
    return outcomes, calls


def test_fetch_data_does_nothing_when_the_files_are_there(tmp_path, write_mnist_like, steps, capsys):
    write_mnist_like(tmp_path / "debian", gz=True)
    assert fetch_data.fetch(tmp_path / "debian", tmp_path / "cache") == 0
    assert steps[1] == [] and f"found in {tmp_path / 'debian'}" in capsys.readouterr().out
    write_mnist_like(tmp_path / "cache" / "FashionMNIST" / "raw", gz=False)
    assert fetch_data.fetch(tmp_path / "nowhere", tmp_path / "cache") == 0
    assert steps[1] == [] and f"found in {tmp_path / 'cache'}" in capsys.readouterr().out


def test_fetch_data_stops_at_the_first_step_that_puts_the_files_in_place(tmp_path, write_mnist_like, steps, capsys):
    outcomes, calls = steps

    def download(cache):
        write_mnist_like(cache, gz=True)

    outcomes.update(apt_install="needs root", torchvision_download=download)
    assert fetch_data.fetch(tmp_path / "debian", tmp_path / "cache") == 0
    assert calls == ["apt_install", "torchvision_download"]
    assert "needs root" in capsys.readouterr().out


def test_fetch_data_fails_with_one_message_naming_every_step(tmp_path, steps, capsys):
    outcomes, calls = steps
    # A step that reports success but leaves no files counts as failed too.
    outcomes.update(apt_install=None, torchvision_download="no network", unpack_deb="no apt lists")
    assert fetch_data.fetch(tmp_path / "debian", tmp_path / "cache") == 1
    assert calls == ["apt_install", "torchvision_download", "unpack_deb"]
    message = capsys.readouterr().err
    assert f"finished, but the files are not in {tmp_path / 'debian'}" in message
    assert "no network" in message and "no apt lists" in message
    assert "apt-get install dataset-fashion-mnist" in message and str(tmp_path / "cache") in message


def test_unreadable_files_stop_fetch_data_with_what_to_delete(tmp_path, steps):
    (tmp_path / "debian").mkdir()
    for name in fetch_data.FILES:
        (tmp_path / "debian" / name).write_bytes(gzip.compress(b"\0\0\x08\x03truncated")[:20])
    with pytest.raises(SystemExit, match=f"files in {tmp_path / 'debian'} are unreadable"):
        fetch_data.fetch(tmp_path / "debian", tmp_path / "cache")


# Your own images: classes matched by name, unlabelled sets, the evaluation split's
# names, images that do not decode.


def write_image(path: Path, seed: int = 0, side: int = 12, fmt: str = "PNG") -> bytes:
    """A random RGB image at `path` (parents made); returns its bytes."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def folder_config(root: Path, *overrides: str):
    return load_config(None, ["data.name=imagefolder", f"data.root={root}", f"data.image_size={SIZE}", *overrides])


def test_imagefolder_classes_are_matched_by_name_across_splits(tmp_path):
    for name in "abc":
        for i in range(2):
            write_image(tmp_path / "train" / name / f"{i}.png", ord(name) + i)
    for name in "ac":  # val lacks b: c must keep train's index 2
        write_image(tmp_path / "val" / name / "0.png", ord(name))
    train, test, split = load_splits(folder_config(tmp_path))
    assert split == "val" and train.num_classes == 3 and train.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert test.labels.tolist() == [0, 2]
    write_image(tmp_path / "val" / "zebra" / "0.png")
    with pytest.raises(UnknownClass, match=f"'zebra' in {tmp_path / 'val'}"):
        load_splits(folder_config(tmp_path))


def test_unlabelled_image_folders_load_without_labels(tmp_path):
    for i in range(3):
        write_image(tmp_path / "flat" / f"{i}.jpg", i, fmt="JPEG")  # the root itself: no split folders
        write_image(tmp_path / "split" / "train" / f"{i}.png", i)
    write_image(tmp_path / "split" / "test" / "a" / "0.png")
    train, test, split = load_splits(folder_config(tmp_path / "flat"))
    assert (len(train), train.num_classes, test, split) == (3, 0, None, None)
    assert train.labels.tolist() == [NO_LABEL] * 3
    c = folder_config(tmp_path / "flat")
    shape = describe(c)
    assert shape.unevaluated and shape.test_split is None and "no labels" in shape.describe()
    train, test, split = load_splits(folder_config(tmp_path / "split"))
    assert (train.num_classes, test.num_classes, split) == (0, 1, "test")
    assert "train split has no labels" in why_unevaluated(split, train.num_classes, test.num_classes)
    write_image(tmp_path / "split" / "train" / "a" / "0.png")
    with pytest.raises(DataError, match="both images"):
        load_splits(folder_config(tmp_path / "split"))


def parquet_rows(path: Path, n: int, labels: bool = True, bad_row: int | None = None):
    images = [b"not an image" if i == bad_row else write_image(path.parent / "x.png", i) for i in range(n)]
    (path.parent / "x.png").unlink(missing_ok=True)
    columns = {"image": images} | ({"label": np.arange(n) % 2} if labels else {})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)


def test_unlabelled_parquet_loads_without_labels(tmp_path):
    parquet_rows(tmp_path / "train.parquet", 4, labels=False)
    c = load_config(None, ["data.name=parquet", f"data.root={tmp_path}", f"data.image_size={SIZE}"])
    for stream in ("true", "false"):
        c.data.stream = stream == "true"
        data = open_input(c, 0, 1)
        assert (data.rows, data.num_classes, data.test_split, data.test_rows) == (4, 0, None, 0)
        assert data.unevaluated.startswith("no evaluation split")
        ((_, _, labels),) = list(data.share("train", 4))
        assert labels.tolist() == [NO_LABEL] * 4
        assert list(data.share("test", 2)) == []


@pytest.mark.parametrize("kind", ["imagefolder", "parquet"])
def test_the_evaluation_split_is_found_by_the_names_people_use(tmp_path, kind):
    def add(split: str):
        if kind == "imagefolder":
            write_image(tmp_path / split / "a" / "0.png")
        else:
            parquet_rows(tmp_path / "data" / f"{split}-00000-of-00001.parquet", 2)

    def chosen(*overrides):
        c = load_config(None, [f"data.name={kind}", f"data.root={tmp_path}", f"data.image_size={SIZE}", *overrides])
        return load_splits(c)[2]

    add("train")
    assert chosen() is None
    for split in ("validation", "valid", "val", "test"):  # each preferred to those before it
        add(split)
        assert chosen() == split
    assert chosen("data.test_split=valid") == "valid"
    if kind == "imagefolder":
        shutil.rmtree(tmp_path / "valid")
    else:
        (tmp_path / "data" / "valid-00000-of-00001.parquet").unlink()
    with pytest.raises(DatasetMissing, match="data.test_split=valid: no valid split .*test, val, validation"):
        chosen("data.test_split=valid")
    with pytest.raises(ConfigError, match="data.test_split must be one of"):
        chosen("data.test_split=holdout")


def test_an_image_that_does_not_decode_is_named_or_skipped_and_counted(tmp_path):
    good = write_image(tmp_path / "train" / "a" / "0.jpg", fmt="JPEG")
    (tmp_path / "train" / "a" / "1.jpg").write_bytes(good[: len(good) // 2])  # truncated
    write_image(tmp_path / "train" / "a" / "2.png")
    train = load_splits(folder_config(tmp_path))[0]
    with pytest.raises(BadImage, match=f"^{tmp_path / 'train' / 'a' / '1.jpg'}: cannot decode"):
        train.__getitems__([0, 1, 2])
    bad = BadImages("skip")
    train = load_splits(folder_config(tmp_path, "data.on_bad_image=skip"), bad)[0]
    for _ in range(2):
        images, idx, _ = train.__getitems__([0, 1, 2])
        assert idx.tolist() == [0, 2] and images.shape == (2, 3, SIZE, SIZE)
    assert bad.skipped == {str(tmp_path / "train" / "a" / "1.jpg")}

    parquet_rows(tmp_path / "pq" / "train.parquet", 4, bad_row=2)
    c = load_config(None, ["data.name=parquet", f"data.root={tmp_path / 'pq'}", f"data.image_size={SIZE}"])
    with pytest.raises(BadImage, match=r"train.parquet, row group 0, row 2: cannot decode"):
        load_splits(c)
    c.data.on_bad_image = "skip"
    data = open_input(c, 0, 1)
    assert data.rows == 4 and data.bad.skipped == set()  # nothing decoded yet
    (images, idx, labels), *rest = list(data.share("train", 8))
    assert idx.tolist() == [0, 1, 3] and labels.tolist() == [0, 1, 1] and not rest
    assert len(data.bad.skipped) == 1 and "row group 0, row 2" in next(iter(data.bad.skipped))


def test_the_image_size_line_says_when_the_images_are_much_larger(tmp_path):
    write_image(tmp_path / "train" / "0.png", side=4 * SIZE)
    line = describe(folder_config(tmp_path)).describe()
    assert f"images {4 * SIZE}x{4 * SIZE} trained at 3x{SIZE}x{SIZE}" in line and "data.image_size" in line
    line = describe(folder_config(tmp_path, f"data.image_size={2 * SIZE + 1}")).describe()
    assert "data.image_size" not in line
