"""Parquet streamed to the train workers: `StreamedInput`, the `trainer.input.Input` of
``data.name=parquet`` with ``data.stream=true`` (the default). The files, the index and
the decoding are `trainer.parquet`'s; this module owns who reads which rows when.

- **Index:** from the files' footers (`trainer.parquet.ParquetSplit`): an image's bank row is its
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

import multiprocessing
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from trainer.config import Config
from trainer.images import STATS_IMAGES, BadImages, batch_as_is, image_stats, why_unevaluated
from trainer.parquet import IMAGE, INDEX, LABEL, ParquetSplit, Piece, decode, eval_split, source_size

_CHUNK = 256  # rows decoded together, and handed over from a loader process at once


class StreamedInput:
    """Parquet row groups streamed to each worker; see the module's docstring."""

    def __init__(self, config: Config, rank: int, world: int, on_gpu: bool = False):
        d = config.data
        self.config, self.rank, self.world = config, rank, world
        self.bad = BadImages(d.on_bad_image)
        # Unset: 1 decoding process on a GPU worker, none on CPU, where training takes the
        # worker's cores and a decoding process competes with it. Skipping bad images
        # decodes here, where the skipped ones are counted.
        default = 1 if on_gpu and not self.bad.skip else 0
        self.loader_workers = default if d.loader_workers is None else d.loader_workers
        self.train = ParquetSplit(d.root, "train", d.subset, self.bad)
        self.test_split = eval_split(d.root, d.test_split)
        self.test = ParquetSplit(d.root, self.test_split, d.test_subset, self.bad) if self.test_split else None
        self.rows, self.num_classes = len(self.train), self.train.num_classes
        self.test_rows = len(self.test) if self.test else 0
        self.unevaluated = why_unevaluated(self.test_split, self.num_classes, self.test and self.test.num_classes)
        self.batch = config.train.batch_size // world
        self.channels, self.side = 3, d.image_size  # `decode` makes every image RGB at that side
        self.source_size = source_size(self.train)
        self.form = f"streamed from {len(self.train.files)} Parquet file(s)"

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

    def epoch_batches(self, epoch: int, skip: int = 0) -> Iterator:
        """`skip`: the batches taken already (a resume mid-epoch). Their rows go through
        the shuffle buffer as before, so the batches after them are the same, but whole
        rounds of the reading processes' chunks are passed over without decoding; only
        the rows after the last such round are decoded and dropped. (Images that
        data.on_bad_image=skip left out of the skipped batches are not known undecoded:
        each shifts the batches after by a row.)"""
        pieces = self.epoch_pieces(epoch)
        processes = max(1, min(self.loader_workers, len(pieces)))
        rows = skip * self.batch
        rounds = _whole_rounds(pieces, processes, rows)
        stream = _Stream(
            self.train,
            pieces,
            self.config.data.image_size,
            self.config.data.shuffle_buffer,
            (self.config.train.seed, epoch, self.rank),
            undecoded=rounds,
        )
        chunks = _drop_rows(self._chunks(stream), rows - rounds * processes * _CHUNK)
        return _rebatch(chunks, self.batch, self.batches_per_epoch() - skip)

    def _chunks(self, stream: _Stream) -> Iterator:
        workers = min(self.loader_workers, len(stream.pieces))
        stream.split.close()  # nothing open travels to the loader processes
        if not workers:
            return iter(stream)
        return iter(
            DataLoader(
                stream,
                batch_size=None,
                num_workers=workers,
                collate_fn=batch_as_is,
                multiprocessing_context=_loader_context(),
            )
        )

    def share(self, split: str, batch: int) -> Iterator:
        """This worker's share of `split` (a contiguous run of rows, every row on one
        worker) in batches of `batch`: in index order per loader process."""
        data = self.train if split == "train" else self.test
        if data is None:  # no evaluation split
            return iter(())
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


class _Stream(IterableDataset):
    """Decoded chunks ``(uint8 images, global indices, labels)`` of `pieces`, through a
    shuffle buffer of `buffer_rows` encoded rows (0: in order). In a DataLoader with
    several processes, process i reads pieces i, i + n, ..."""

    def __init__(self, split: ParquetSplit, pieces: list[Piece], size: int, buffer_rows: int, seed, undecoded=0):
        self.split, self.pieces, self.size, self.buffer_rows, self.seed = split, pieces, size, buffer_rows, seed
        self.undecoded = undecoded  # each process's first chunks: taken from the buffer, not decoded

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        rng = np.random.default_rng([*self.seed, worker])
        images, indices, labels = [], [], []  # the buffer: encoded rows
        taken = 0
        for piece in self.pieces[worker::workers]:
            values = self.split.read_piece(piece)
            images += values[IMAGE]
            indices += values[INDEX].tolist()
            labels += values[LABEL].tolist()
            while len(images) >= max(self.buffer_rows, _CHUNK):
                chunk = self._chunk(images, indices, labels, rng, decoded=taken >= self.undecoded)
                taken += 1
                if chunk is not None:
                    yield chunk
        while images:
            chunk = self._chunk(images, indices, labels, rng, decoded=taken >= self.undecoded)
            taken += 1
            if chunk is not None:
                yield chunk
        self.split.close()

    def _chunk(self, images: list, indices: list, labels: list, rng, decoded: bool = True):
        """Take up to _CHUNK rows out of the buffer (at random when shuffling) and decode
        them; None for rows taken without decoding."""
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
        if not decoded:
            return None
        images, kept = decode(list(encoded), self.size, lambda i: self.split.where(idx[i]), self.split.bad)
        kept = torch.from_numpy(kept)
        return (
            torch.from_numpy(images),
            torch.tensor(idx, dtype=torch.long)[kept],
            torch.tensor(y, dtype=torch.long)[kept],
        )


def _rebatch(chunks, batch: int, count: int | None) -> Iterator:
    """Batches of exactly `batch` rows from chunks of any size; at most `count` of them
    (None: all, the last one possibly short). Chunks that skipped bad images may leave
    the rows short of `count` batches: the last one is then short, so every worker still
    takes the same steps."""
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
            yield tuple(part[at : at + batch] for part in joined)
            at, made = at + batch, made + 1
        if count is not None and made >= count:
            return
        pending, held = ([tuple(part[at:] for part in joined)] if held > at else []), held - at
    if held and (count is None or made < count):
        yield tuple(torch.cat(parts) for parts in zip(*pending))


def _whole_rounds(pieces: list[Piece], processes: int, rows: int) -> int:
    """How many rounds of chunks, one from each of `processes` reading processes in turn
    (the order a DataLoader hands them over in), the first `rows` rows of the stream
    hold whole. Only rounds in which every process hands over a full chunk are counted:
    their rows are the same whatever is decoded."""
    held = [sum(len(p) for p in pieces[i::processes]) for i in range(processes)]
    return max(0, min(rows // (processes * _CHUNK), min(held) // _CHUNK))


def _drop_rows(chunks, rows: int) -> Iterator:
    """The chunks without their first `rows` rows."""
    for chunk in chunks:
        if rows >= len(chunk[1]):
            rows -= len(chunk[1])
            continue
        if rows:
            chunk, rows = tuple(part[rows:] for part in chunk), 0
        yield chunk


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


def _span(n: int, rank: int, world: int) -> tuple[int, int]:
    """Worker `rank`'s part of n rows split as evenly as can be (every row once)."""
    return rank * n // world, (rank + 1) * n // world


def _first_images(split: ParquetSplit, n: int, size: int) -> torch.Tensor:
    """The split's first `n` images (index order), decoded; reads as few row groups as it can."""
    encoded = []
    for group, kept in enumerate(split.kept()):
        if kept:
            encoded += split.read_piece(Piece(group, 0, min(int(kept), n - len(encoded))), (IMAGE,))[IMAGE]
        if len(encoded) >= n:
            break
    split.close()
    return torch.from_numpy(decode(encoded, size, lambda i: split.where(i), split.bad)[0])


_CONTEXT = None


def _loader_context():
    """Loader processes start from a forkserver, not as forks of the train worker: that
    process holds gRPC channels, Ray's threads and open files, which a forked child
    would inherit mid-use. The server imports torch, this module and the readers once,
    so each start is still a fork, of a clean process."""
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        # What a loader process needs before its first row: the first batch waits for it.
        _CONTEXT.set_forkserver_preload(
            ["torch", "trainer.streaming", "pyarrow.parquet", "PIL.PngImagePlugin", "PIL.JpegImagePlugin"]
        )
    return _CONTEXT
