"""Small Parquet image sets unlike Fashion-MNIST, for checking the defaults on data
nobody tuned for.

Each set is a folder with ``train.parquet`` and ``test.parquet`` (an encoded-PNG column
``image`` and an integer column ``label``), the layout ``data.name=parquet`` reads:

- ``digits``: the 1,797 handwritten 8x8 digits that ship with scikit-learn (UCI's
  optical digits), upscaled to 32x32 grayscale. Real handwriting, 10 classes.
- ``glyphs``: characters drawn in the machine's DejaVu fonts with random size, slant,
  position and noise; 28x28 grayscale. The classes include mirror pairs (b/d, p/q) and
  rotation pairs (6/9), so an augmentation that flips destroys the label.
- ``shapes``: coloured shapes on coloured, noisy backgrounds, 32x32 RGB; the class is
  the shape, colour and size are random (a CIFAR-like colour task).

Every set is seeded: the same command writes the same bytes.
"""

from __future__ import annotations

import io
import math
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFilter, ImageFont

SETS = ("digits", "glyphs", "shapes")
GLYPHS = "bdpq2569NSZ7"
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
SHAPES = ("disc", "square", "triangle", "cross", "ring", "bar", "star", "diamond")


def _digits(rng: np.random.Generator, count: int):
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise SystemExit("the digits set needs scikit-learn: pip install scikit-learn") from e
    data = load_digits()
    order = rng.permutation(len(data.target))[:count] if count else rng.permutation(len(data.target))
    for i in order:
        pixels = (data.images[i] * (255 / 16)).clip(0, 255).astype(np.uint8)
        yield Image.fromarray(pixels, "L").resize((32, 32), Image.BILINEAR), int(data.target[i])


def _glyphs(rng: np.random.Generator, count: int):
    fonts: list[Path | None] = sorted(FONT_DIR.glob("*.ttf"))
    if not fonts:  # None: Pillow's own font, so the set still builds, with less variety
        print(f"warning: no fonts in {FONT_DIR}: the glyphs set is drawn in Pillow's own", file=sys.stderr)
        fonts = [None]
    for _ in range(count or 1800):
        label = int(rng.integers(len(GLYPHS)))
        path, size = fonts[rng.integers(len(fonts))], int(rng.integers(16, 25))
        font = ImageFont.load_default(size=size) if path is None else ImageFont.truetype(str(path), size)
        canvas = Image.new("L", (48, 48), 0)
        ImageDraw.Draw(canvas).text((24, 24), GLYPHS[label], fill=int(rng.integers(170, 256)), font=font, anchor="mm")
        angle, shift = float(rng.uniform(-12, 12)), tuple(int(t) for t in rng.integers(-4, 5, 2))
        canvas = canvas.rotate(angle, resample=Image.BILINEAR, translate=shift).crop((10, 10, 38, 38))
        pixels = (np.asarray(canvas, np.float64) + rng.normal(0, 12, (28, 28))).clip(0, 255).astype(np.uint8)
        yield Image.fromarray(pixels, "L"), label


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, colour) -> None:
    box, w = (cx - r, cy - r, cx + r, cy + r), r / 3
    radii = [r if k % 2 == 0 else r / 2.5 for k in range(10)]
    star = [(cx + q * math.sin(k * math.pi / 5), cy - q * math.cos(k * math.pi / 5)) for k, q in enumerate(radii)]
    polygons = dict(star=star, triangle=[(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)])
    polygons["diamond"] = [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    rectangles = dict(square=[box], bar=[(cx - r, cy - w, cx + r, cy + w)])
    rectangles["cross"] = [(cx - w, cy - r, cx + w, cy + r), (cx - r, cy - w, cx + r, cy + w)]
    if shape in polygons:
        draw.polygon(polygons[shape], fill=colour)
    elif shape == "disc":
        draw.ellipse(box, fill=colour)
    elif shape == "ring":
        draw.ellipse(box, outline=colour, width=max(2, int(r / 3)))
    for rectangle in rectangles.get(shape, ()):
        draw.rectangle(rectangle, fill=colour)


def _shapes(rng: np.random.Generator, count: int):
    for _ in range(count or 2000):
        label = int(rng.integers(len(SHAPES)))
        background = tuple(int(c) for c in rng.integers(0, 256, 3))
        colour = background  # redrawn until it stands out from the background
        while sum(abs(a - b) for a, b in zip(colour, background)) < 150:
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        canvas = Image.new("RGB", (64, 64), background)
        r = float(rng.uniform(9, 18))
        cx, cy = (float(v) for v in rng.uniform(8 + r, 56 - r, 2))
        _draw_shape(ImageDraw.Draw(canvas), SHAPES[label], cx, cy, r, colour)
        canvas = canvas.resize((32, 32), Image.BILINEAR).filter(ImageFilter.SMOOTH)
        pixels = (np.asarray(canvas, np.float64) + rng.normal(0, 10, (32, 32, 3))).clip(0, 255).astype(np.uint8)
        yield Image.fromarray(pixels, "RGB"), label


MAKERS = {"digits": _digits, "glyphs": _glyphs, "shapes": _shapes}


def write_set(name: str, folder: Path, *, count: int = 0, test_fraction: float = 0.25, seed: int = 0) -> dict:
    """Write `name` into folder/train.parquet and folder/test.parquet; return the counts."""
    rng = np.random.default_rng([seed, SETS.index(name)])
    images, labels = [], []
    for image, label in MAKERS[name](rng, count):
        image.save(png := io.BytesIO(), format="PNG")
        images.append(png.getvalue())
        labels.append(label)
    test = int(round(len(labels) * test_fraction))
    folder.mkdir(parents=True, exist_ok=True)
    for split, part in (("train", slice(test, None)), ("test", slice(0, test))):
        table = pa.table({"image": pa.array(images[part], pa.binary()), "label": pa.array(labels[part], pa.int64())})
        pq.write_table(table, folder / f"{split}.parquet")
    return {"set": name, "train": len(labels) - test, "test": test, "classes": len(set(labels))}
