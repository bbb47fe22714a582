"""Datasets held in memory, every kind by name, and `MemoryInput`, the worker's input
over them. The torchvision sets (Fashion-MNIST, MNIST, CIFAR, STL-10) are loaded here;
ImageFolder comes from `trainer.folders`, a Parquet split decoded into memory from
`trainer.parquet` (``data.stream=false``). The torchvision sets live in memory as one
uint8 tensor; ImageFolder images are decoded on access, resized to ``image_size``.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from trainer.config import Config
from trainer.folders import load_imagefolder
from trainer.images import (
    STATS_IMAGES,
    BadImages,
    DatasetMissing,
    InMemoryImages,
    batch_as_is,
    image_stats,
    seeded_subset,
    why_unevaluated,
)
from trainer.parquet import ParquetSplit, eval_split, load_split

NAMES = ("fashion-mnist", "mnist", "cifar10", "cifar100", "stl10", "imagefolder", "parquet")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_ROOT = Path(os.environ.get("INSTDISC_DATA", Path.home() / ".cache" / "instdisc" / "data"))


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format), gzipped or not."""
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
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


def load_dataset(
    name: str,
    root: str | None = None,
    train: bool = True,
    download: bool = True,
    image_size: int = 32,
    parquet_subset: int = 0,
):
    """A split as a random-access dataset: the train split, or the evaluation split
    (the first present; DatasetMissing when there is none).
    `parquet_subset`: a Parquet split's evenly spaced subset (what `data.subset` takes
    of Parquet, streamed or not)."""
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
        train_set, test_set, _ = load_imagefolder(path, image_size)
        if not train and test_set is None:
            raise DatasetMissing(f"dataset 'imagefolder': no evaluation split in {path}")
        return train_set if train else test_set
    split = "train" if train else eval_split(root, None) or "test"  # "test": find_files says what is missing
    return load_split(root, split, image_size, parquet_subset)


def load_datasets(config: Config):
    """(train, evaluation split or None) as `load_splits` loads them."""
    return load_splits(config)[:2]


def load_splits(config: Config, bad: BadImages | None = None):
    """(train, evaluation split or None when there is none, its name) as random-access
    datasets, subsets applied: `MemoryInput`'s data, and what `instdisc eval` embeds.
    The evaluation split is ``data.test_split``, else the first of test, val, valid,
    validation present (always ``test`` for the torchvision sets)."""
    d = config.data
    bad = bad or BadImages(d.on_bad_image)
    if d.name == "parquet":  # evenly spaced subsets, as streaming takes them
        split = eval_split(d.root, d.test_split)
        train = load_split(d.root, "train", d.image_size, d.subset, bad)
        return train, load_split(d.root, split, d.image_size, d.test_subset, bad) if split else None, split
    if d.name == "imagefolder":
        if not d.root:
            raise ValueError("data.root is required for data.name='imagefolder'")
        train, test, split = load_imagefolder(Path(d.root).expanduser(), d.image_size, d.test_split, bad)
    else:
        if d.test_split not in (None, "test"):
            raise DatasetMissing(f"data.test_split={d.test_split}: data.name={d.name} has a test split only")
        train = load_dataset(d.name, d.root, train=True, download=d.download, image_size=d.image_size)
        test = load_dataset(d.name, d.root, train=False, download=d.download, image_size=d.image_size)
        split = "test"
    if test is not None:
        test = seeded_subset(test, d.test_subset, config.train.seed + 1)
    return seeded_subset(train, d.subset, config.train.seed), test, split


class MemoryInput:
    """`trainer.input.Input` over a random-access dataset, all of it on every worker:
    a ``DistributedSampler`` deals each epoch's batches."""

    def __init__(self, config: Config, rank: int, world: int):
        self.config, self.rank, self.world = config, rank, world
        self.bad = BadImages(config.data.on_bad_image)
        self.train_set, self.test_set, self.test_split = load_splits(config, self.bad)
        self.rows, self.test_rows = len(self.train_set), len(self.test_set) if self.test_set is not None else 0
        self.num_classes = self.train_set.num_classes
        self.unevaluated = why_unevaluated(
            self.test_split, self.num_classes, self.test_set.num_classes if self.test_set is not None else None
        )
        self.channels, self.side = self.train_set.image_shape
        self.source_size = self.train_set.source_size
        self.form = "in memory"
        self.workers = 0 if config.data.loader_workers is None else config.data.loader_workers
        self.sampler = DistributedSampler(
            self.train_set, num_replicas=world, rank=rank, shuffle=True, seed=config.train.seed, drop_last=True
        )
        self.batch = config.train.batch_size // world
        self._fingerprint = self._identify()

    def batches_per_epoch(self) -> int:
        return len(self.sampler) // self.batch

    def epoch_batches(self, epoch: int, skip: int = 0) -> Iterator:
        self.sampler.set_epoch(epoch)
        order = list(self.sampler)
        ends = range((skip + 1) * self.batch, self.batches_per_epoch() * self.batch + 1, self.batch)
        return self._load(self.train_set, [order[end - self.batch : end] for end in ends])

    def share(self, split: str, batch: int) -> Iterator:
        """Rows rank, rank + W, ... of `split` in batches of `batch` (``eval.source=fresh``
        reassembles the whole by that stride)."""
        dataset = self.train_set if split == "train" else self.test_set
        if dataset is None:  # no evaluation split
            return iter(())
        indices = list(range(self.rank, len(dataset), self.world))
        return self._load(dataset, [indices[i : i + batch] for i in range(0, len(indices), batch)])

    def _load(self, dataset, chunks: list[list[int]]) -> Iterator:
        """The rows of each chunk of indices as a batch, in order."""
        if self.workers:
            return iter(DataLoader(dataset, batch_sampler=chunks, num_workers=self.workers, collate_fn=batch_as_is))
        return (dataset.__getitems__(chunk) for chunk in chunks)

    def labels_at(self, indices: torch.Tensor) -> torch.Tensor:
        return self.train_set.labels[indices.cpu()]

    def stats(self) -> tuple[list[float], list[float]]:
        images = getattr(self.train_set, "images", None)
        if images is None:
            images = self.train_set.__getitems__(list(range(min(self.rows, STATS_IMAGES))))[0]
        return image_stats(images[:10000])

    def fingerprint(self) -> dict:
        return self._fingerprint

    def _identify(self) -> dict:
        """Parquet's from its files (so `data.stream` may change across a resume); else
        the dataset's name, size and subset. Once, at start: every checkpoint records it."""
        d = self.config.data
        if d.name == "parquet":
            return ParquetSplit(d.root, "train", d.subset).fingerprint()
        what = {
            "name": d.name,
            "rows": self.rows,
            "subset": d.subset,
            "subset_seed": self.config.train.seed if d.subset else None,
        }
        return {"sha256": hashlib.sha256(repr(sorted(what.items())).encode()).hexdigest()[:16], "root": d.root} | what
