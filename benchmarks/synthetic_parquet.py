"""A synthetic image set of any size in the Hugging Face Parquet layout, for measuring
the data path (`instdisc scale data`) at sizes no downloaded set has here.

    python -m benchmarks.synthetic_parquet --images 600000 --test-images 10000 --output DIR

writes ``DIR/data/train-00000-of-00006.parquet`` ... and ``DIR/data/test-00000-of-00001.parquet``:
an ``image`` column of structs ``{bytes, path}`` holding grayscale PNGs (16x16 by default)
and an integer ``label`` column, 100,000 rows per file in row groups of 10,000, and the
schema metadata that lets ``datasets.load_dataset("parquet")`` see an Image and a ClassLabel.

The ten classes are shapes (bars at four angles, plus, X, ring, disc, square outline,
triangle) with random position, size, thickness, small rotation, contrast and pixel
noise: a kNN on raw pixels gets some of them, an encoder learns more. Every row group
is drawn from its own seeded generator, so the same arguments write the same bytes
whatever the number of processes.

Files are written one row group at a time by a pool of processes (one file per task,
renamed into place when whole), so memory stays at a few row groups however many
images are asked for. ``DIR/synthetic.json`` is written last; a second run with the
same arguments finds it, checks the files against it and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import struct
import sys
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.args import positive_int

MANIFEST = "synthetic.json"
VERSION = 1  # part of the manifest: a change to the images must not reuse old files
CLASSES = ("horizontal bar", "vertical bar", "diagonal", "anti-diagonal", "plus", "x", "ring", "disc",
           "square outline", "triangle")
SPLITS = {"train": 0, "test": 1}  # also the split's part of each row group's seed
FILE_NAME = re.compile(r"^(train|test)-\d{5}-of-\d{5}\.parquet$")
SCHEMA = pa.schema(
    [("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("label", pa.int64())],
    metadata={b"huggingface": json.dumps({"info": {"features": {
        "image": {"_type": "Image"}, "label": {"names": list(CLASSES), "_type": "ClassLabel"}}}}).encode()})


@dataclass(frozen=True)
class Spec:
    """Everything that decides the bytes written; the manifest records it."""
    images: int
    test_images: int
    image_size: int = 16
    seed: int = 0
    rows_per_file: int = 100_000
    rows_per_group: int = 10_000
    version: int = VERSION


@dataclass(frozen=True)
class FileTask:
    split: str
    index: int
    of: int
    rows: int

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:05d}-of-{self.of:05d}.parquet"


def plan(spec: Spec) -> list[FileTask]:
    tasks = []
    for split, total in (("train", spec.images), ("test", spec.test_images)):
        files = max(1, math.ceil(total / spec.rows_per_file))
        for index in range(files):
            tasks.append(FileTask(split, index, files, min(spec.rows_per_file, total - index * spec.rows_per_file)))
    return tasks


# -- the images ----------------------------------------------------------------------

def _distances(label: int, u: np.ndarray, v: np.ndarray, s: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Approximate signed distance in pixels to class `label`'s shape (negative inside);
    u, v are pixel offsets from the shape's centre, s its half-size, t its half-thickness."""
    root2, root5 = math.sqrt(2), math.sqrt(5)
    a, b = (u - v) / root2, (u + v) / root2  # the diagonal axes
    r = np.sqrt(u * u + v * v)
    bars = {0: lambda: np.maximum(np.abs(v) - t, np.abs(u) - s),
            1: lambda: np.maximum(np.abs(u) - t, np.abs(v) - s),
            2: lambda: np.maximum(np.abs(a) - t, np.abs(b) - s),
            3: lambda: np.maximum(np.abs(b) - t, np.abs(a) - s)}
    if label in bars:
        return bars[label]()
    if label == 4:
        return np.minimum(bars[0](), bars[1]())
    if label == 5:
        return np.minimum(bars[2](), bars[3]())
    if label == 6:
        return np.abs(r - s) - t
    if label == 7:
        return r - s
    if label == 8:
        return np.abs(np.maximum(np.abs(u), np.abs(v)) - s) - t
    # 9: a filled triangle, apex up (v grows downwards), base 2s wide
    return np.maximum(v - s, np.maximum((2 * u - v - s) / root5, (-2 * u - v - s) / root5))


def draw(rng: np.random.Generator, labels: np.ndarray, size: int) -> np.ndarray:
    """(n, size, size) uint8 images of the classes in `labels`."""
    n = len(labels)
    images = np.empty((n, size, size), dtype=np.uint8)
    grid = np.arange(size, dtype=np.float32) - (size - 1) / 2

    def column(low, high):  # one value per image, broadcast over its pixels
        return rng.uniform(low, high, n).astype(np.float32)[:, None, None]

    cx, cy = column(-0.2, 0.2) * size, column(-0.2, 0.2) * size
    half, thick = column(0.22, 0.38) * size, column(0.05, 0.10) * size
    angle = column(-math.pi / 12, math.pi / 12)
    bg, sigma = column(0, 110), column(8, 32)
    fg = np.minimum(bg + column(50, 200), 255)
    x, y = grid[None, None, :] - cx, grid[None, :, None] - cy
    cos, sin = np.cos(angle), np.sin(angle)
    u, v = cos * x + sin * y, cos * y - sin * x
    for label in range(len(CLASSES)):
        chosen = np.flatnonzero(labels == label)
        if len(chosen) == 0:
            continue
        d = _distances(label, u[chosen], v[chosen], half[chosen], thick[chosen])
        ink = np.clip(0.5 - d, 0.0, 1.0)  # a pixel-wide soft edge
        pixels = bg[chosen] + (fg[chosen] - bg[chosen]) * ink
        pixels += sigma[chosen] * rng.standard_normal(pixels.shape, dtype=np.float32)
        images[chosen] = np.clip(pixels + 0.5, 0, 255).astype(np.uint8)
    return images


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_encoder(height: int, width: int):
    """`encode((h, w) uint8) -> PNG bytes`, grayscale, 8 bits. Written by hand because
    the header and trailer are the same for every image: a third of PIL's time."""
    head = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    tail = _chunk(b"IEND", b"")

    def encode(rows_with_filter: np.ndarray) -> bytes:
        return head + _chunk(b"IDAT", zlib.compress(rows_with_filter.tobytes(), 6)) + tail

    return encode


def encode_pngs(images: np.ndarray) -> list[bytes]:
    n, height, width = images.shape
    scanlines = np.zeros((n, height, width + 1), dtype=np.uint8)  # filter byte 0 (None) before each row
    scanlines[:, :, 1:] = images
    encode = png_encoder(height, width)
    return [encode(one) for one in scanlines]


def row_group(spec: Spec, task: FileTask, group: int, rows: int) -> pa.Table:
    rng = np.random.default_rng([spec.seed, SPLITS[task.split], task.index, group])
    labels = rng.integers(0, len(CLASSES), rows)
    pngs = encode_pngs(draw(rng, labels, spec.image_size))
    images = pa.StructArray.from_arrays([pa.array(pngs, pa.binary()), pa.nulls(rows, pa.string())],
                                        fields=list(SCHEMA.field("image").type))
    return pa.Table.from_arrays([images, pa.array(labels, pa.int64())], schema=SCHEMA)


def write_file(spec: Spec, task: FileTask, folder: Path) -> dict:
    """One file, row group by row group, renamed into place when complete."""
    final = folder / task.name
    partial = folder / f".{task.name}.partial"
    with pq.ParquetWriter(partial, SCHEMA, compression="none") as writer:  # PNG bytes do not compress further
        for group, start in enumerate(range(0, task.rows, spec.rows_per_group)):
            writer.write_table(row_group(spec, task, group, min(spec.rows_per_group, task.rows - start)),
                               row_group_size=spec.rows_per_group)
    os.replace(partial, final)
    return {"rows": task.rows, "bytes": final.stat().st_size}


# -- the dataset ---------------------------------------------------------------------

def read_manifest(output: Path) -> dict | None:
    try:
        return json.loads((output / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def is_complete(output: Path, spec: Spec) -> bool:
    """Whether `output` holds exactly what `spec` writes: the manifest says so and every
    file it lists is there with its recorded size."""
    manifest = read_manifest(output)
    if manifest is None or manifest.get("spec") != asdict(spec):
        return False
    for name, facts in manifest["files"].items():
        path = output / "data" / name
        if not path.is_file() or path.stat().st_size != facts["bytes"]:
            return False
    return True


def generate(output: str | Path, spec: Spec, workers: int | None = None, log=print) -> dict:
    """Write the dataset into `output` (or find it already there); returns the manifest."""
    output = Path(output)
    if is_complete(output, spec):
        manifest = read_manifest(output)
        log(f"{output}: already holds {spec.images:,} + {spec.test_images:,} synthetic images; nothing written")
        return manifest
    folder = output / "data"
    folder.mkdir(parents=True, exist_ok=True)
    (output / MANIFEST).unlink(missing_ok=True)
    tasks = plan(spec)
    wanted = {task.name for task in tasks}
    for stale in folder.iterdir():  # an earlier size's files would join the split's glob
        if stale.name not in wanted and (FILE_NAME.match(stale.name) or stale.name.endswith(".partial")):
            stale.unlink()
    workers = max(1, min(workers or os.cpu_count() or 1, len(tasks)))
    start = time.perf_counter()
    if workers == 1:
        facts = [write_file(spec, task, folder) for task in tasks]
    else:
        # spawn, not fork: the caller may have threads (a sampler, Ray's) that fork would copy mid-lock.
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            facts = list(pool.map(write_file, [spec] * len(tasks), tasks, [folder] * len(tasks)))
    seconds = time.perf_counter() - start
    manifest = {"generator": "benchmarks.synthetic_parquet", "spec": asdict(spec), "classes": list(CLASSES),
                "files": {task.name: fact for task, fact in zip(tasks, facts)}, "seconds": seconds,
                "processes": workers}
    temporary = output / f".{MANIFEST}.partial"
    temporary.write_text(json.dumps(manifest, indent=2))
    os.replace(temporary, output / MANIFEST)
    total = spec.images + spec.test_images
    log(f"{output}: wrote {total:,} images in {len(tasks)} files "
        f"({sum(f['bytes'] for f in facts) / 1e6:,.0f} MB) in {seconds:.1f} s with {workers} processes "
        f"({total / seconds:,.0f} images/s)")
    return manifest


def train_files(output: str | Path) -> list[Path]:
    return sorted((Path(output) / "data").glob("train-*.parquet"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.synthetic_parquet",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=positive_int, default=600_000, help="training images (default 600,000)")
    parser.add_argument("--test-images", type=positive_int, default=10_000, help="test images (default 10,000)")
    parser.add_argument("--output", required=True, help="the dataset folder (data/ goes inside it)")
    parser.add_argument("--image-size", type=positive_int, default=16, help="side in pixels (default 16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows-per-file", type=positive_int, default=100_000)
    parser.add_argument("--rows-per-group", type=positive_int, default=10_000)
    parser.add_argument("--workers", type=positive_int, default=None, help="processes (default: one per CPU)")
    args = parser.parse_args(argv)
    spec = Spec(args.images, args.test_images, args.image_size, args.seed, args.rows_per_file, args.rows_per_group)
    generate(args.output, spec, args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
