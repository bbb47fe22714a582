"""Datasets that yield ``(image uint8 (C, H, W), index, label)``.

Small datasets live in memory as one uint8 tensor (Parquet ones decoded once, resized to
``image_size``); ImageFolder images are decoded on demand and resized to ``image_size``.
Training streams Parquet instead by default (``trainer.input``). Every dataset also fetches
whole batches (``__getitems__``), so a DataLoader with ``collate_fn=batch_as_is``
hands over stacked tensors without per-image collation.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

NAMES = ("fashion-mnist", "mnist", "cifar10", "cifar100", "stl10", "imagefolder", "parquet")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_ROOT = Path(os.environ.get("INSTDISC_DATA", Path.home() / ".cache" / "instdisc" / "data"))


class DatasetMissing(FileNotFoundError):
    """The files are not there; the message says where we looked and how to get them."""


class InMemoryImages(Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: int):
        self.images, self.labels, self.num_classes = images.contiguous(), labels.long(), classes

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], i, int(self.labels[i])

    def __getitems__(self, indices):
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.images[idx], idx, self.labels[idx]

    def subset(self, indices) -> "InMemoryImages":
        idx = torch.as_tensor(indices, dtype=torch.long)
        return InMemoryImages(self.images[idx], self.labels[idx], self.num_classes)


def image_to_chw(image, size: int) -> np.ndarray:
    """PIL image -> uint8 (3, size, size): RGB, the shorter side resized to `size`
    (bilinear, antialiased), centre crop. Every decoded dataset's images go through here."""
    from PIL import Image

    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    w, h = image.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
        w, h = image.size
        left, top = (w - size) // 2, (h - size) // 2
        image = image.crop((left, top, left + size, top + size))
    pixels = np.asarray(image)
    if pixels.ndim == 2:  # grey: the three channels PIL's convert("RGB") would make, without its copy
        return np.broadcast_to(pixels, (3, *pixels.shape))
    return pixels.transpose(2, 0, 1)


def _to_chw_uint8(image, size: int) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image_to_chw(image, size)))


class DecodedImages(Dataset):
    """Images decoded per access from `load(i) -> PIL image`."""

    def __init__(self, loader, labels, classes: int, size: int):
        self._load, self.labels, self.num_classes, self.size = loader, torch.as_tensor(labels).long(), classes, size

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return _to_chw_uint8(self._load(int(i)), self.size), int(i), int(self.labels[i])

    def __getitems__(self, indices):
        idx = torch.as_tensor(indices, dtype=torch.long)
        return torch.stack([_to_chw_uint8(self._load(int(i)), self.size) for i in idx]), idx, self.labels[idx]

    def subset(self, indices) -> "DecodedImages":
        idx = [int(i) for i in indices]
        return DecodedImages(lambda j, load=self._load: load(idx[j]), self.labels[idx], self.num_classes, self.size)


def batch_as_is(batch):
    """collate_fn for datasets whose ``__getitems__`` already returns a batch."""
    return batch


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format), gzipped or not."""
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _mnist_like(name: str, root: Path | None, train: bool, download: bool) -> InMemoryImages:
    prefix = "train" if train else "t10k"
    candidates = [root] if root else ([DEBIAN_FASHION_MNIST] if name == "fashion-mnist" else []) + [DEFAULT_ROOT / name]
    # The files themselves, or where torchvision's download put them under that folder.
    torchvision_layout = "FashionMNIST" if name == "fashion-mnist" else "MNIST"
    for folder in [f for c in candidates for f in (c, c / torchvision_layout / "raw")]:
        for suffix in (".gz", ""):
            images = folder / f"{prefix}-images-idx3-ubyte{suffix}"
            labels = folder / f"{prefix}-labels-idx1-ubyte{suffix}"
            if images.exists() and labels.exists():
                x = torch.from_numpy(_read_idx(images).copy())[:, None]
                y = torch.from_numpy(_read_idx(labels).astype(np.int64))
                return InMemoryImages(x, y, 10)
    target = root or DEFAULT_ROOT / name
    if download:
        from torchvision import datasets

        cls = datasets.FashionMNIST if name == "fashion-mnist" else datasets.MNIST
        try:
            ds = cls(str(target), train=train, download=True)
        except Exception as error:
            raise DatasetMissing(_missing_message(name, candidates, error)) from error
        return InMemoryImages(ds.data[:, None].clone(), ds.targets.clone(), 10)
    raise DatasetMissing(_missing_message(name, candidates, None))


def _missing_message(name, looked, error) -> str:
    where = ", ".join(str(p) for p in looked)
    how = {
        "fashion-mnist": "`apt-get install dataset-fashion-mnist` (Debian) or set data.download=true with internet",
    }.get(name, "set data.download=true with internet access, or point data.root at the files")
    reason = f" (download failed: {error})" if error else ""
    return f"dataset {name!r}: no files in {where}{reason}. Get them with {how}."


def _torchvision(name: str, root: Path | None, train: bool, download: bool) -> InMemoryImages:
    from torchvision import datasets

    target = root or DEFAULT_ROOT / name
    try:
        if name == "stl10":
            ds = datasets.STL10(str(target), split="train" if train else "test", download=download)
            return InMemoryImages(torch.from_numpy(ds.data), torch.from_numpy(ds.labels.astype(np.int64)), 10)
        cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
        ds = cls(str(target), train=train, download=download)
    except RuntimeError as error:  # torchvision: "Dataset not found or corrupted"
        raise DatasetMissing(_missing_message(name, [target], error if download else None)) from error
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2)
    return InMemoryImages(images, torch.tensor(ds.targets), 10 if name == "cifar10" else 100)


def _imagefolder(root: Path, train: bool, size: int) -> DecodedImages:
    from torchvision.datasets import ImageFolder

    folder = root / ("train" if train else "test")
    if not folder.is_dir():
        raise DatasetMissing(f"dataset 'imagefolder': no folder {folder}; data.root must hold train/ and test/, "
                             "each with one sub-folder of images per class")
    ds = ImageFolder(str(folder))
    return DecodedImages(lambda i: ds.loader(ds.samples[i][0]), [t for _, t in ds.samples], len(ds.classes), size)


def _parquet(root: str, train: bool, size: int, subset: int) -> InMemoryImages:
    """The split (or its evenly spaced `subset`, as streaming takes it) decoded into
    memory once: `data.stream=false` and `instdisc eval`, which hold N images. Training
    streams Parquet by default (`trainer.input`)."""
    from trainer.parquet import IMAGE, INDEX, LABEL, ParquetSplit, decode

    split = ParquetSplit(root, "train" if train else "test", subset)
    images = np.empty((len(split), 3, size, size), dtype=np.uint8)
    labels = np.empty(len(split), dtype=np.int64)
    for piece in split.pieces():
        values = split.read_piece(piece)
        images[values[INDEX]] = decode(values[IMAGE], size, lambda i, at=values[INDEX]: split.where(int(at[i])))
        labels[values[INDEX]] = values[LABEL]
    return InMemoryImages(torch.from_numpy(images), torch.from_numpy(labels), split.num_classes)


def load_dataset(name: str, root: str | None = None, train: bool = True, download: bool = True,
                 image_size: int = 32, parquet_subset: int = 0):
    """A split as a random-access dataset. `parquet_subset`: a Parquet split's evenly
    spaced subset (what `data.subset` takes of Parquet, streamed or not)."""
    if name not in NAMES:
        raise ValueError(f"data.name must be one of {NAMES}, got {name!r}")
    path = Path(root).expanduser() if root else None
    if name in ("fashion-mnist", "mnist"):
        return _mnist_like(name, path, train, download)
    if name in ("cifar10", "cifar100", "stl10"):
        return _torchvision(name, path, train, download)
    if path is None:
        raise ValueError(f"data.root is required for data.name={name!r}")
    if name == "imagefolder":
        return _imagefolder(path, train, image_size)
    return _parquet(root, train, image_size, parquet_subset)


def seeded_subset(dataset, n: int | None, seed: int):
    """The first `n` of a seeded permutation (all of it when n is falsy)."""
    if not n or n >= len(dataset):
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n]
    return dataset.subset(order.sort().values)
