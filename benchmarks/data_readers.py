"""Read and decode a Parquet image split once, three ways, for `instdisc scale data`'s
reader comparison (which decides whether training reads through Ray Data):

- ``pyarrow``: one process, row group by row group (``ParquetFile.read_row_group``),
  each image decoded with PIL.
- ``pyarrow-2``: the same, split over two DataLoader worker processes that take
  alternate row groups: what a train worker with ``data.loader_workers=2`` does.
- ``ray-data``: ``ray.data.read_parquet`` + ``map_batches`` (the same decode) +
  ``iter_torch_batches``, on a private local Ray given every CPU of the machine.

Every reader hands the consumer uint8 tensors (batch, 3, size, size) in batches of
``--batch`` and the labels, decoded by the same function, so the comparison is of the
reading, not of the decoder. Run as a child process (``python -m benchmarks.data_readers
--reader R --root DIR``) so that the parent can sample its process tree's memory; the
last stdout line is a JSON object: images, seconds (first batch asked for to last
received), startup_seconds (imports, Ray's start) and images_per_sec.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

READERS = ("pyarrow", "pyarrow-2", "ray-data")


def split_files(root: str | Path, split: str = "train") -> list[Path]:
    """The split's files in either layout the synthetic sets and Hugging Face use."""
    root = Path(root)
    found = sorted(root.glob(f"data/{split}-*.parquet")) or sorted(root.glob(f"{split}-*.parquet"))
    single = root / f"{split}.parquet"
    if not found and single.exists():
        found = [single]
    if not found:
        raise FileNotFoundError(f"no {split} files under {root}")
    return found


def image_bytes(column) -> list[bytes]:
    """The encoded images of an Arrow column: binary, or Hugging Face's {bytes, path}."""
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_struct(column.type):
        column = column.field("bytes")
    return column.to_pylist()


def decode(encoded: list[bytes], size: int) -> np.ndarray:
    """(n, 3, size, size) uint8: RGB, shorter side resized to `size`, centre crop."""
    from PIL import Image

    out = np.empty((len(encoded), 3, size, size), dtype=np.uint8)
    for i, data in enumerate(encoded):
        image = Image.open(io.BytesIO(data)).convert("RGB")
        if image.size != (size, size):
            scale = size / min(image.size)
            w, h = max(size, round(image.width * scale)), max(size, round(image.height * scale))
            image = image.resize((w, h), Image.BILINEAR)
            left, top = (w - size) // 2, (h - size) // 2
            image = image.crop((left, top, left + size, top + size))
        out[i] = np.asarray(image).transpose(2, 0, 1)
    return out


def row_groups(files: list[Path]) -> list[tuple[Path, int]]:
    import pyarrow.parquet as pq

    return [(path, g) for path in files for g in range(pq.ParquetFile(path).num_row_groups)]


def _read_group(path: Path, group: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    import pyarrow.parquet as pq

    table = pq.ParquetFile(path).read_row_group(group, columns=["image", "label"])
    return decode(image_bytes(table.column("image")), size), table.column("label").to_numpy().astype(np.int64)


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


def pyarrow_batches(files: list[Path], size: int, batch: int, workers: int):
    if workers == 0:
        return _rebatch((_read_group(path, g, size) for path, g in row_groups(files)), batch)
    import torch
    from torch.utils.data import DataLoader, IterableDataset, get_worker_info

    units = row_groups(files)

    class Groups(IterableDataset):
        def __iter__(self):
            info = get_worker_info()
            for path, g in units[info.id::info.num_workers]:
                x, y = _read_group(path, g, size)
                yield torch.from_numpy(x), torch.from_numpy(y)

    loader = DataLoader(Groups(), batch_size=None, num_workers=workers)
    return _rebatch(((x.numpy(), y.numpy()) for x, y in loader), batch)


def ray_data_batches(files: list[Path], size: int, batch: int):
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # A private local Ray with every CPU: Ray Data schedules its read and decode tasks
    # on them while this driver consumes.
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False

    def decode_batch(table):
        return {"image": decode(image_bytes(table.column("image")), size), "label": table.column("label").to_numpy()}

    dataset = ray.data.read_parquet([str(f) for f in files], columns=["image", "label"])
    dataset = dataset.map_batches(decode_batch, batch_format="pyarrow")
    return ((b["image"], b["label"]) for b in dataset.iter_torch_batches(batch_size=batch))


def run(reader: str, root: str, size: int, batch: int) -> dict:
    import torch  # noqa: F401  (its import is start-up, not reading)

    files = split_files(root)
    started = time.perf_counter()
    if reader == "ray-data":
        batches = ray_data_batches(files, size, batch)
    else:
        batches = pyarrow_batches(files, size, batch, 0 if reader == "pyarrow" else 2)
    first = time.perf_counter()
    images = checksum = 0
    for x, y in batches:
        assert x.dtype.is_floating_point is False and x.shape[1:] == (3, size, size), x.shape
        images += len(y)
        checksum += int(y.sum())
    seconds = time.perf_counter() - first
    return {"reader": reader, "images": images, "files": len(files), "seconds": seconds,
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
