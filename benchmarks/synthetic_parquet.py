"""A synthetic image set of any size in the Hugging Face Parquet layout, for measuring
the data path (`instdisc scale data`) at sizes no downloaded set has here:
``DIR/data/train-00000-of-00006.parquet`` ... and ``DIR/data/test-00000-of-00001.parquet``,
an ``image`` column of structs ``{bytes, path}`` holding grayscale PNGs and an integer
``label`` column, 100,000 rows per file in row groups of 10,000, with the schema
metadata that lets ``datasets.load_dataset("parquet")`` see an Image and a ClassLabel.

The ten classes are shapes (bars at four angles, plus, X, ring, disc, square outline,
triangle) with random position, size, thickness, small rotation, contrast and pixel
noise: a kNN on raw pixels gets some of them, an encoder learns more. Every row group
is drawn from its own seeded generator, so the same spec writes the same bytes whatever
the number of processes. ``DIR/synthetic.json`` (the spec) is written last: a set that
has it is complete and is not written again.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST = "synthetic.json"
CLASSES = "horizontal bar|vertical bar|diagonal|anti-diagonal|plus|x|ring|disc|square outline|triangle".split("|")
_FEATURES = {"image": {"_type": "Image"}, "label": {"names": CLASSES, "_type": "ClassLabel"}}
SCHEMA = pa.schema(
    [("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("label", pa.int64())],
    metadata={b"huggingface": json.dumps({"info": {"features": _FEATURES}}).encode()},
)


@dataclass(frozen=True)
class Spec:
    """Everything that decides the bytes written."""

    images: int
    test_images: int
    image_size: int = 16
    seed: int = 0
    rows_per_file: int = 100_000
    rows_per_group: int = 10_000
    version: int = 1  # a change to the images must not reuse old files


def _distances(label: int, u: np.ndarray, v: np.ndarray, s: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Approximate signed distance in pixels to class `label`'s shape (negative inside);
    u, v are pixel offsets from the shape's centre, s its half-size, t its half-thickness."""
    root2, root5 = math.sqrt(2), math.sqrt(5)
    a, b = (u - v) / root2, (u + v) / root2  # the diagonal axes
    r = np.sqrt(u * u + v * v)

    def bar(across, along):
        return np.maximum(np.abs(across) - t, np.abs(along) - s)

    shapes = [
        lambda: bar(v, u),
        lambda: bar(u, v),
        lambda: bar(a, b),
        lambda: bar(b, a),
        lambda: np.minimum(bar(v, u), bar(u, v)),
        lambda: np.minimum(bar(a, b), bar(b, a)),
        lambda: np.abs(r - s) - t,
        lambda: r - s,
        lambda: np.abs(np.maximum(np.abs(u), np.abs(v)) - s) - t,
        # a filled triangle, apex up (v grows downwards), base 2s wide
        lambda: np.maximum(v - s, np.maximum((2 * u - v - s) / root5, (-2 * u - v - s) / root5)),
    ]
    return shapes[label]()


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


def encode_pngs(images: np.ndarray) -> list[bytes]:
    """Grayscale 8-bit PNGs, written by hand: the header and trailer are the same for
    every image (a third of PIL's time)."""
    n, height, width = images.shape
    head = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    scanlines = np.zeros((n, height, width + 1), dtype=np.uint8)  # filter byte 0 (None) before each row
    scanlines[:, :, 1:] = images
    return [head + _chunk(b"IDAT", zlib.compress(one.tobytes(), 6)) + _chunk(b"IEND", b"") for one in scanlines]


def write_file(spec: Spec, split: int, index: int, files: int, rows: int, folder: Path) -> int:
    """One file, row group by row group (memory stays at a group), renamed into place
    when whole; its rows."""
    name = f"{('train', 'test')[split]}-{index:05d}-of-{files:05d}.parquet"
    partial = folder / f".{name}.partial"
    with pq.ParquetWriter(partial, SCHEMA, compression="none") as writer:  # PNG bytes do not compress further
        for group, start in enumerate(range(0, rows, spec.rows_per_group)):
            n = min(spec.rows_per_group, rows - start)
            rng = np.random.default_rng([spec.seed, split, index, group])
            labels = rng.integers(0, len(CLASSES), n)
            pngs = encode_pngs(draw(rng, labels, spec.image_size))
            images = pa.StructArray.from_arrays(
                [pa.array(pngs, pa.binary()), pa.nulls(n, pa.string())], fields=list(SCHEMA.field("image").type)
            )
            writer.write_table(pa.Table.from_arrays([images, pa.array(labels, pa.int64())], schema=SCHEMA))
    os.replace(partial, folder / name)
    return rows


def generate(output: Path, spec: Spec) -> str:
    """Write the set into `output` unless it is there already; says what it did."""
    manifest = output / MANIFEST
    if manifest.exists() and json.loads(manifest.read_text()) == asdict(spec):
        return f"{output}: found, nothing written"
    shutil.rmtree(output, ignore_errors=True)  # an unfinished or other set: its files would join the globs
    folder = output / "data"
    folder.mkdir(parents=True)
    tasks = []
    for split, total in enumerate((spec.images, spec.test_images)):
        files = max(1, math.ceil(total / spec.rows_per_file))
        sizes = [min(spec.rows_per_file, total - i * spec.rows_per_file) for i in range(files)]
        tasks += [(spec, split, i, files, rows, folder) for i, rows in enumerate(sizes)]
    start = time.perf_counter()
    workers = max(1, min(os.cpu_count() or 1, len(tasks)))
    # spawn, not fork: the caller may have threads that fork would copy mid-lock.
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        written = sum(pool.map(write_file, *zip(*tasks)))
    manifest.write_text(json.dumps(asdict(spec)))
    seconds = time.perf_counter() - start
    return f"{output}: wrote {written:,} images in {len(tasks)} files in {seconds:.1f} s with {workers} processes"
