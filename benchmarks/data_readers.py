"""Read and decode a Parquet image split once, three ways, for `instdisc scale data`'s
reader comparison (which decides whether training reads through Ray Data):

- ``pyarrow``: one process, row group by row group, read and decoded by the trainer's
  own `trainer.parquet` (``ParquetSplit.read``, ``decode``).
- ``pyarrow-2``: the same, split over two DataLoader worker processes that take
  alternate row groups: what a train worker with ``data.loader_workers=2`` does.
- ``ray-data``: ``ray.data.read_parquet`` + ``map_batches`` (the same decode) +
  ``iter_torch_batches``, on a private local Ray given every CPU of the machine.

Every reader hands the consumer uint8 tensors (batch, 3, size, size) in batches of
``--batch`` and the labels, decoded by the same function (`trainer.parquet.decode`), so
the comparison is of the reading, not of the decoder. Run as a child process (``python -m benchmarks.data_readers
--reader R --root DIR``) so that the parent can sample its process tree's memory; the
last stdout line is a JSON object: images, seconds (first batch asked for to last
received), startup_seconds (imports, Ray's start) and images_per_sec.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

READERS = ("pyarrow", "pyarrow-2", "ray-data")


def _read_group(split, group: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One row group of the split, decoded: the trainer's own reading and decoding."""
    from trainer.parquet import IMAGE, LABEL, decode

    values = split.read(*split.groups[group], [IMAGE, LABEL])
    return decode(values[IMAGE], size), values[LABEL]


def _rebatch(groups, batch: int):
    """Fixed-size torch batches (views) out of row-group-sized arrays; the last may be short."""
    import torch

    left_x = left_y = None  # fewer than `batch` rows carried into the next group
    for x, y in groups:
        if left_y is not None and len(left_y):
            x, y = np.concatenate([left_x, x]), np.concatenate([left_y, y])
        whole = len(y) - len(y) % batch
        for start in range(0, whole, batch):
            yield torch.from_numpy(x[start:start + batch]), torch.from_numpy(y[start:start + batch])
        left_x, left_y = x[whole:], y[whole:]
    if left_y is not None and len(left_y):
        yield torch.from_numpy(left_x), torch.from_numpy(left_y)


def pyarrow_batches(split, size: int, batch: int, workers: int):
    groups = range(len(split.groups))
    if workers == 0:
        return _rebatch((_read_group(split, g, size) for g in groups), batch)
    import torch
    from torch.utils.data import DataLoader, IterableDataset, get_worker_info

    class Groups(IterableDataset):
        def __iter__(self):
            info = get_worker_info()
            for g in groups[info.id::info.num_workers]:
                x, y = _read_group(split, g, size)
                yield torch.from_numpy(x), torch.from_numpy(y)

    loader = DataLoader(Groups(), batch_size=None, num_workers=workers)
    return _rebatch(((x.numpy(), y.numpy()) for x, y in loader), batch)


def ray_data_batches(split, size: int, batch: int):
    import ray

    from trainer.parquet import decode, image_bytes

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # A private local Ray with every CPU: Ray Data schedules its read and decode tasks
    # on them while this driver consumes.
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False

    def decode_batch(table):
        return {"image": decode(image_bytes(table.column("image")).to_pylist(), size),
                "label": table.column("label").to_numpy()}

    dataset = ray.data.read_parquet([f.path for f in split.files], columns=["image", "label"])
    dataset = dataset.map_batches(decode_batch, batch_format="pyarrow")
    return ((b["image"], b["label"]) for b in dataset.iter_torch_batches(batch_size=batch))


def run(reader: str, root: str, size: int, batch: int) -> dict:
    import torch  # noqa: F401  (its import is start-up, not reading)

    from trainer.parquet import ParquetSplit

    split = ParquetSplit(root, "train")  # the trainer's own discovery and index
    started = time.perf_counter()
    if reader == "ray-data":
        batches = ray_data_batches(split, size, batch)
    else:
        batches = pyarrow_batches(split, size, batch, 0 if reader == "pyarrow" else 2)
    first = time.perf_counter()
    images = checksum = 0
    for x, y in batches:
        assert x.dtype.is_floating_point is False and x.shape[1:] == (3, size, size), x.shape
        images += len(y)
        checksum += int(y.sum())
    seconds = time.perf_counter() - first
    return {"reader": reader, "images": images, "files": len(split.files), "seconds": seconds,
            "startup_seconds": first - started, "images_per_sec": images / seconds, "label_sum": checksum}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.data_readers")
    parser.add_argument("--reader", choices=READERS, required=True)
    parser.add_argument("--root", required=True, help="a dataset folder (data/train-*.parquet)")
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args(argv)
    print(json.dumps(run(args.reader, args.root, args.image_size, args.batch)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
