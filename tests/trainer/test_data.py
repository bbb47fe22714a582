"""Datasets on real images: Fashion-MNIST files, and Parquet / ImageFolder written here."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from trainer.data import DatasetMissing, load_dataset, seeded_subset


def fashion_images(n):
    ds = load_dataset("fashion-mnist", train=False, download=False)
    return ds.images[:n, 0].numpy(), ds.labels[:n].numpy()


def test_fashion_mnist_yields_image_index_label():
    ds = load_dataset("fashion-mnist", download=False)
    assert len(ds) == 60000 and ds.num_classes == 10
    image, index, label = ds[123]
    assert image.shape == (1, 28, 28) and image.dtype == torch.uint8 and index == 123 and 0 <= label < 10
    images, idx, labels = ds.__getitems__([5, 1])
    assert images.shape == (2, 1, 28, 28) and idx.tolist() == [5, 1]
    sub = seeded_subset(ds, 100, seed=0)
    assert len(sub) == 100 and torch.equal(sub.images, seeded_subset(ds, 100, seed=0).images)


def png_bytes(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_parquet_tables(tmp_path):
    images, labels = fashion_images(20)
    for split in ("train", "test"):
        table = pa.table({"image": [png_bytes(a) for a in images], "label": labels.astype(np.int64)})
        pq.write_table(table, tmp_path / f"{split}.parquet")
    ds = load_dataset("parquet", str(tmp_path), train=True, image_size=16)
    assert len(ds) == 20 and ds.num_classes == int(labels.max()) + 1
    image, index, label = ds[3]
    assert image.shape == (3, 16, 16) and image.dtype == torch.uint8 and label == labels[3]
    batch = ds.__getitems__([0, 1, 2])
    assert batch[0].shape == (3, 3, 16, 16)


def test_parquet_in_the_hugging_face_layout(tmp_path):
    images, labels = fashion_images(6)
    struct = [{"bytes": png_bytes(a), "path": None} for a in images]
    pq.write_table(pa.table({"image": struct, "label": labels.astype(np.int64)}), tmp_path / "train.parquet")
    ds = load_dataset("parquet", str(tmp_path), train=True, image_size=28)
    assert ds[0][0].shape == (3, 28, 28)


def test_imagefolder(tmp_path):
    images, labels = fashion_images(12)
    for split in ("train", "test"):
        for i, (a, y) in enumerate(zip(images, labels)):
            folder = tmp_path / split / f"class_{y}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(a).save(folder / f"{i}.png")
    ds = load_dataset("imagefolder", str(tmp_path), train=True, image_size=20)
    assert len(ds) == 12 and ds.num_classes == len(set(labels))
    assert ds[0][0].shape == (3, 20, 20)


def test_missing_files_say_where_and_how(tmp_path):
    with pytest.raises(DatasetMissing, match="train.parquet"):
        load_dataset("parquet", str(tmp_path))
    with pytest.raises(DatasetMissing, match=str(tmp_path / "train")):
        load_dataset("imagefolder", str(tmp_path))
    with pytest.raises(DatasetMissing, match="dataset-fashion-mnist"):
        load_dataset("fashion-mnist", str(tmp_path), download=False)
    with pytest.raises(ValueError, match="data.name must be one of"):
        load_dataset("svhn")


def test_files_in_torchvisions_download_layout_are_found_offline(tmp_path):
    # deploy/Dockerfile bakes datasets in through torchvision: root/FashionMNIST/raw/.
    import shutil

    from trainer.data import DEBIAN_FASHION_MNIST

    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for path in DEBIAN_FASHION_MNIST.glob("t10k-*"):
        shutil.copy(path, raw)
    test_set = load_dataset("fashion-mnist", str(tmp_path), train=False, download=False)
    assert len(test_set) == 10_000
