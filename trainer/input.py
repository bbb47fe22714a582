"""What a train worker reads: its batches for an epoch, its share of a split for the
bank and for evaluation, and the labels kNN needs; from memory or streamed from Parquet.

`open_input` picks the form. Datasets that fit in memory (Fashion-MNIST, CIFAR, an
image folder, Parquet with ``data.stream=false``) are `MemoryInput`: random access, a
``DistributedSampler``. Parquet is streamed by default (`StreamedInput`):

- **Index:** from the files' footers (`trainer.parquet`): an image's bank row is its
  row position over the sorted files. No worker holds anything of size N: labels for
  kNN are read per row group for the rows asked (`labels_at`).
- **An epoch's order:** the row groups in a seeded random order (new each epoch),
  each one's rows permuted (by a seed of its own, drawn when it is read), the whole
  sequence rotated by a random offset; worker r takes the r-th of W equal spans of it,
  ``N // W`` rows. So every worker reads only its row groups (the two at its span's
  ends are shared with its neighbours), takes the same number of steps
  (``N // global_batch``, fixed by the metadata), and over epochs sees every part of
  the dataset. Then a shuffle buffer of ``data.shuffle_buffer`` encoded rows mixes
  consecutive row groups. The ``N mod global_batch`` rows an epoch leaves out differ
  from epoch to epoch.
- **Memory:** a worker knows an epoch as row-group ranges (O(row groups), never O(N));
  it holds one row group's encoded images, the shuffle buffer (encoded) and a few
  decoded chunks per reading process.
- **Decoding** runs in ``data.loader_workers`` background processes (each reads every
  n-th of the worker's row groups), started from a forkserver, or in the train worker
  itself with 0 (the default on CPU; 1 on a GPU).
"""

from __future__ import annotations

import hashlib
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset

from trainer.config import Config
from trainer.data import batch_as_is, load_dataset, seeded_subset
from trainer.parquet import IMAGE, INDEX, LABEL, ParquetSplit, Piece, decode

_CHUNK = 256  # rows decoded together, and handed over from a loader process at once
STATS_IMAGES = 512


def streamed(config: Config) -> bool:
    return config.data.name == "parquet" and config.data.stream


def loader_workers(config: Config, on_gpu: bool = False) -> int:
    """``data.loader_workers``; when unset, 1 background decoder for streamed Parquet
    on a GPU worker, none otherwise. A CPU worker's training takes its cores: there a
    decoding process competes with it, and decoding in the worker was faster (0.94x the
    in-memory images/s against 0.88x with a loader process, BENCHMARKS.md)."""
    workers = config.data.loader_workers
    if workers is None:
        return 1 if streamed(config) and on_gpu else 0
    return workers


def load_datasets(config: Config):
    """(train, test) as random-access datasets, subsets applied: `MemoryInput`'s data,
    and what `instdisc eval` embeds."""
    d = config.data
    if d.name == "parquet":  # evenly spaced subsets, as streaming takes them
        return tuple(load_dataset(d.name, d.root, train=train, image_size=d.image_size, parquet_subset=subset)
                     for train, subset in ((True, d.subset), (False, d.test_subset)))
    train = load_dataset(d.name, d.root, train=True, download=d.download, image_size=d.image_size)
    test = load_dataset(d.name, d.root, train=False, download=d.download, image_size=d.image_size)
    return seeded_subset(train, d.subset, config.train.seed), seeded_subset(test, d.test_subset, config.train.seed + 1)


def image_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] units of uint8 images (N, C, H, W)."""
    x = images.float() / 255
    return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).clamp(min=1e-3).tolist()


class DataShape:
    """What the launch checks before anything starts: rows, image shape, classes."""

    def __init__(self, train_rows: int, test_rows: int, channels: int, side: int, num_classes: int):
        self.train_rows, self.test_rows = train_rows, test_rows
        self.channels, self.side, self.num_classes = channels, side, num_classes
        self.streamed_files: int | None = None  # a streamed dataset's train files

    def describe(self) -> str:
        how = "in memory" if self.streamed_files is None else f"streamed from {self.streamed_files} Parquet file(s)"
        return (f"{self.train_rows:,} train / {self.test_rows:,} test images, {self.channels}x{self.side}x{self.side}, "
                f"{self.num_classes} classes, {how}")


def describe(config: Config) -> DataShape:
    """The dataset's shape for the driver: from Parquet metadata and one decoded image
    when streamed, else from the loaded dataset."""
    if streamed(config):
        d = config.data
        train = ParquetSplit(d.root, "train", d.subset)
        test = ParquetSplit(d.root, "test", d.test_subset)
        first = _first_images(train, 1, d.image_size)
        shape = DataShape(len(train), len(test), first.shape[1], first.shape[2], train.num_classes)
        shape.streamed_files = len(train.files)
        return shape
    train, test = load_datasets(config)
    sample = train[0][0]
    return DataShape(len(train), len(test), sample.shape[0], sample.shape[1], train.num_classes)


def _first_images(split: ParquetSplit, n: int, size: int) -> torch.Tensor:
    """The split's first `n` images (index order), decoded; reads as few row groups as it can."""
    encoded = []
    for group, kept in enumerate(split.kept()):
        if kept:
            encoded += split.read_piece(Piece(group, 0, min(int(kept), n - len(encoded))), (IMAGE,))[IMAGE]
        if len(encoded) >= n:
            break
    split.close()
    return torch.from_numpy(decode(encoded, size, lambda i: split.where(i)))


def open_input(config: Config, rank: int, world: int, on_gpu: bool = False):
    return StreamedInput(config, rank, world, on_gpu) if streamed(config) else MemoryInput(config, rank, world)


def _span(n: int, rank: int, world: int) -> tuple[int, int]:
    """Worker `rank`'s part of n rows split as evenly as can be (every row once)."""
    return rank * n // world, (rank + 1) * n // world


class MemoryInput:
    """A random-access dataset, all of it on every worker."""

    def __init__(self, config: Config, rank: int, world: int):
        self.config, self.rank, self.world = config, rank, world
        self.train_set, self.test_set = load_datasets(config)
        self.rows = len(self.train_set)
        self.num_classes = self.train_set.num_classes
        self.channels, self.side = self.train_set[0][0].shape[:2]
        self.sampler = DistributedSampler(self.train_set, num_replicas=world, rank=rank, shuffle=True,
                                          seed=config.train.seed, drop_last=True)
        self.batch = config.train.batch_size // world
        self.loader = DataLoader(self.train_set, batch_size=self.batch, sampler=self.sampler, drop_last=True,
                                 num_workers=loader_workers(config), collate_fn=batch_as_is)
        self._fingerprint = self._identify()

    def batches_per_epoch(self) -> int:
        return len(self.loader)

    def epoch_batches(self, epoch: int) -> Iterator:
        self.sampler.set_epoch(epoch)
        return iter(self.loader)

    def share(self, split: str, batch: int) -> Iterator:
        """Rows rank, rank + W, ... of `split` in batches of `batch` (``eval.source=fresh``
        reassembles the whole by that stride)."""
        dataset = self.train_set if split == "train" else self.test_set
        indices = list(range(self.rank, len(dataset), self.world))
        chunks = [indices[i:i + batch] for i in range(0, len(indices), batch)]
        workers = loader_workers(self.config)
        if workers:
            return iter(DataLoader(dataset, batch_size=None, sampler=chunks, num_workers=workers,
                                   collate_fn=batch_as_is))
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
        what = {"name": d.name, "rows": self.rows, "subset": d.subset,
                "subset_seed": self.config.train.seed if d.subset else None}
        return {"sha256": hashlib.sha256(repr(sorted(what.items())).encode()).hexdigest()[:16], "root": d.root} | what


class _Stream(IterableDataset):
    """Decoded chunks ``(uint8 images, global indices, labels)`` of `pieces`, through a
    shuffle buffer of `buffer_rows` encoded rows (0: in order). In a DataLoader with
    several processes, process i reads pieces i, i + n, ..."""

    def __init__(self, split: ParquetSplit, pieces: list[Piece], size: int, buffer_rows: int, seed):
        self.split, self.pieces, self.size, self.buffer_rows, self.seed = split, pieces, size, buffer_rows, seed

    def __iter__(self):
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        rng = np.random.default_rng([*self.seed, worker])
        images, indices, labels = [], [], []  # the buffer: encoded rows
        for piece in self.pieces[worker::workers]:
            values = self.split.read_piece(piece)
            images += values[IMAGE]
            indices += values[INDEX].tolist()
            labels += values[LABEL].tolist()
            while len(images) >= max(self.buffer_rows, _CHUNK):
                yield self._chunk(images, indices, labels, rng)
        while images:
            yield self._chunk(images, indices, labels, rng)
        self.split.close()

    def _chunk(self, images: list, indices: list, labels: list, rng):
        """Take up to _CHUNK rows out of the buffer (at random when shuffling) and decode them."""
        n = min(_CHUNK, len(images))
        if self.buffer_rows:
            taken = []
            for _ in range(n):  # swap a random row to the end and pop it
                j = int(rng.integers(len(images)))
                for column in (images, indices, labels):
                    column[j], column[-1] = column[-1], column[j]
                taken.append((images.pop(), indices.pop(), labels.pop()))
            encoded, idx, y = zip(*taken)
        else:
            encoded, idx, y = images[:n], indices[:n], labels[:n]
            del images[:n], indices[:n], labels[:n]
        return (torch.from_numpy(decode(list(encoded), self.size, lambda i: self.split.where(idx[i]))),
                torch.tensor(idx, dtype=torch.long), torch.tensor(y, dtype=torch.long))


def _rebatch(chunks, batch: int, count: int | None) -> Iterator:
    """Batches of exactly `batch` rows from chunks of any size; at most `count` of them
    (None: all, the last one possibly short)."""
    pending: list[tuple] = []
    held = made = 0
    for chunk in chunks:
        pending.append(chunk)
        held += len(chunk[1])
        if held < batch:
            continue
        joined = [torch.cat(parts) for parts in zip(*pending)]
        at = 0
        while held - at >= batch and (count is None or made < count):
            yield tuple(part[at:at + batch] for part in joined)
            at, made = at + batch, made + 1
        if count is not None and made >= count:
            return
        pending, held = ([tuple(part[at:] for part in joined)] if held > at else []), held - at
    if count is None and held:
        yield tuple(torch.cat(parts) for parts in zip(*pending))


class StreamedInput:
    """Parquet row groups streamed to each worker; see the module's docstring."""

    def __init__(self, config: Config, rank: int, world: int, on_gpu: bool = False):
        d = config.data
        self.config, self.rank, self.world = config, rank, world
        self.loader_workers = loader_workers(config, on_gpu)
        self.train = ParquetSplit(d.root, "train", d.subset)
        self.test = ParquetSplit(d.root, "test", d.test_subset)
        self.rows, self.num_classes = len(self.train), self.train.num_classes
        self.batch = config.train.batch_size // world
        first = _first_images(self.train, 1, d.image_size)
        self.channels, self.side = first.shape[1], first.shape[2]

    def batches_per_epoch(self) -> int:
        return self.rows // self.config.train.batch_size

    def epoch_pieces(self, epoch: int) -> list[Piece]:
        """This worker's rows for `epoch` (see the module's docstring), as pieces of row
        groups: every worker computes the same order, in memory of the row groups' count."""
        seed = self.config.train.seed
        rng = np.random.default_rng([seed, epoch])
        kept = self.train.kept()
        pieces = [Piece(int(g), 0, int(kept[g]), (seed, epoch, int(g))) for g in rng.permutation(len(kept))]
        per = self.rows // self.world
        start = (int(rng.integers(self.rows)) + self.rank * per) % self.rows if self.rows else 0
        return _cut(pieces, start, per, self.rows)

    def epoch_batches(self, epoch: int) -> Iterator:
        stream = _Stream(self.train, self.epoch_pieces(epoch), self.config.data.image_size,
                         self.config.data.shuffle_buffer, (self.config.train.seed, epoch, self.rank))
        return _rebatch(self._chunks(stream), self.batch, self.batches_per_epoch())

    def _chunks(self, stream: _Stream) -> Iterator:
        workers = min(self.loader_workers, len(stream.pieces))
        stream.split.close()  # nothing open travels to the loader processes
        if not workers:
            return iter(stream)
        return iter(DataLoader(stream, batch_size=None, num_workers=workers, collate_fn=batch_as_is,
                               multiprocessing_context=_loader_context()))

    def share(self, split: str, batch: int) -> Iterator:
        """This worker's share of `split` (a contiguous run of rows, every row on one
        worker) in batches of `batch`: in index order per loader process."""
        data = self.train if split == "train" else self.test
        lo, hi = _span(len(data), self.rank, self.world)
        pieces = _cut(data.pieces(), lo, hi - lo, len(data))
        stream = _Stream(data, pieces, self.config.data.image_size, 0, (0,))
        return _rebatch(self._chunks(stream), batch, None)

    def labels_at(self, indices: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.train.labels_at(indices.cpu().numpy()))

    def stats(self) -> tuple[list[float], list[float]]:
        return image_stats(_first_images(self.train, min(self.rows, STATS_IMAGES), self.config.data.image_size))

    def fingerprint(self) -> dict:
        return self.train.fingerprint()


def _cut(pieces: list[Piece], start: int, length: int, total: int) -> list[Piece]:
    """Rows [start, start + length) of the pieces' concatenation, wrapping past `total`."""
    if length <= 0:
        return []
    if start + length > total:
        return _cut(pieces, start, total - start, total) + _cut(pieces, 0, start + length - total, total)
    out, at = [], 0
    for piece in pieces:
        lo, hi = max(start - at, 0), min(start + length - at, len(piece))
        if lo < hi:
            out.append(Piece(piece.group, piece.lo + lo, piece.lo + hi, piece.seed))
        at += len(piece)
        if at >= start + length:
            break
    return out


_CONTEXT = None


def _loader_context():
    """Loader processes start from a forkserver, not as forks of the train worker: that
    process holds gRPC channels, Ray's threads and open files, which a forked child
    would inherit mid-use. The server imports torch, this module and the readers once,
    so each start is still a fork, of a clean process."""
    global _CONTEXT
    if _CONTEXT is None:
        import multiprocessing

        _CONTEXT = multiprocessing.get_context("forkserver")
        # What a loader process needs before its first row: the first batch waits for it.
        _CONTEXT.set_forkserver_preload(["torch", "trainer.input", "pyarrow.parquet", "PIL.PngImagePlugin",
                                         "PIL.JpegImagePlugin"])
    return _CONTEXT
