"""What every dataset kind shares: images as uint8 (C, H, W) tensors, random-access
datasets that yield ``(image, index, label)`` and fetch whole batches, the one resize
rule, the evaluation split's names, what an unlabelled split is, what becomes of an
image that does not decode (`BadImages`), and the errors for files that are not there
or not usable.

Every dataset fetches whole batches (``__getitems__``), so a DataLoader with
``collate_fn=batch_as_is`` hands over stacked tensors without per-image collation.

An unlabelled split has ``num_classes == 0`` and every label ``NO_LABEL``.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from trainer.config import EVAL_SPLITS

log = logging.getLogger(__name__)

STATS_IMAGES = 512  # images the normalisation statistics are taken from, when not all are in memory
NO_LABEL = -1  # every label of an unlabelled split
# PIL's errors for bytes that are not an image it can decode (truncated, foreign, too large).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class DatasetMissing(FileNotFoundError):
    """The files are not there; the message says where we looked and how to get them."""


class DataError(ValueError):
    """The files are there but not usable as they are; the message names the file or folder."""


class BadImage(DataError):
    """An image that does not decode; the message names it (its path, or its file, row
    group and row) on one line."""

    def __init__(self, message: str):
        # A DataLoader process's error comes back as BadImage("Caught BadImage in DataLoader
        # worker process 0.\nOriginal Traceback ...\n...BadImage: <message>"): keep <message>.
        super().__init__(message.rsplit("BadImage: ", 1)[-1].strip() if "\n" in message else message)


class BadImages:
    """What ``data.on_bad_image`` does with an image that does not decode: ``fail``
    raises BadImage; ``skip`` leaves it out of its batch (which is then that much
    shorter), logging each image once and remembering it (`skipped`)."""

    def __init__(self, policy: str = "fail"):
        self.skip = policy == "skip"
        self.skipped: set[str] = set()

    def met(self, where: str, error: Exception) -> None:
        message = f"{where}: cannot decode the image ({type(error).__name__}: {error})"
        if not self.skip:
            raise BadImage(message) from error
        if where not in self.skipped:
            self.skipped.add(where)
            log.warning(f"skipped (data.on_bad_image=skip): {message}")


def choose_eval_split(present, wanted: str | None, where: str) -> str | None:
    """The evaluation split: `wanted` (``data.test_split``), refused when it is not among
    the `present` splits; else the first of EVAL_SPLITS present; None for none."""
    if wanted:
        if wanted not in present:
            found = ", ".join(s for s in EVAL_SPLITS if s in present) or "none"
            raise DatasetMissing(
                f"data.test_split={wanted}: no {wanted} split in {where} (evaluation splits found: {found})"
            )
        return wanted
    return next((split for split in EVAL_SPLITS if split in present), None)


def why_unevaluated(test_split: str | None, train_classes: int, test_classes: int | None) -> str | None:
    """Why kNN and the linear probe cannot score this data (None: they can). kNN's
    neighbours vote with the train rows' labels, and both score against the test labels."""
    if test_split is None:
        return f"no evaluation split ({', '.join(EVAL_SPLITS)}) in data.root"
    if train_classes == 0:
        return "the train split has no labels (kNN neighbours vote with train labels)"
    if not test_classes:
        return f"the {test_split} split has no labels"
    return None


class InMemoryImages(Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: int, source_size=None):
        self.images, self.labels, self.num_classes = images.contiguous(), labels.long(), classes
        self.source_size = source_size  # (width, height) of the first image before resizing; None: not decoded

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], i, int(self.labels[i])

    def __getitems__(self, indices):
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.images[idx], idx, self.labels[idx]

    @property
    def image_shape(self) -> tuple[int, int]:
        """(channels, side)."""
        return int(self.images.shape[1]), int(self.images.shape[2])

    def subset(self, indices) -> InMemoryImages:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return InMemoryImages(self.images[idx], self.labels[idx], self.num_classes, self.source_size)


class DecodedImages(Dataset):
    """Image files decoded per access, resized to `size`; a batch leaves out the images
    that `bad` skips."""

    def __init__(self, paths: list[str], labels, classes: int, size: int, bad: BadImages):
        self.paths, self.labels, self.num_classes, self.size = paths, torch.as_tensor(labels).long(), classes, size
        self.bad = bad

    def __len__(self):
        return len(self.labels)

    @property
    def image_shape(self) -> tuple[int, int]:
        return 3, self.size

    @property
    def source_size(self) -> tuple[int, int] | None:
        """(width, height) of the first image, from its header; None when it has none."""
        try:
            with Image.open(self.paths[0]) as image:
                return image.size
        except DECODE_ERRORS:
            return None

    def _decode(self, i: int) -> torch.Tensor | None:
        try:
            with Image.open(self.paths[i]) as image:
                return _to_chw_uint8(image, self.size)
        except DECODE_ERRORS as error:
            self.bad.met(self.paths[i], error)
            return None

    def __getitem__(self, i):
        images, idx, labels = self.__getitems__([i])
        if not len(idx):
            raise BadImage(f"{self.paths[i]}: skipped, it does not decode")
        return images[0], int(i), int(labels[0])

    def __getitems__(self, indices):
        idx = torch.as_tensor(indices, dtype=torch.long)
        decoded = [self._decode(int(i)) for i in idx]
        kept = torch.tensor([image is not None for image in decoded], dtype=torch.bool)
        images = [image for image in decoded if image is not None]
        stacked = torch.stack(images) if images else torch.empty(0, 3, self.size, self.size, dtype=torch.uint8)
        return stacked, idx[kept], self.labels[idx][kept]

    def subset(self, indices) -> DecodedImages:
        idx = [int(i) for i in indices]
        return DecodedImages([self.paths[i] for i in idx], self.labels[idx], self.num_classes, self.size, self.bad)


def image_to_chw(image: Image.Image, size: int) -> np.ndarray:
    """PIL image -> uint8 (3, size, size): RGB, the shorter side resized to `size`
    (bilinear, antialiased), centre crop. Every decoded dataset's images go through here."""
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


def _to_chw_uint8(image: Image.Image, size: int) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image_to_chw(image, size)))


def batch_as_is(batch):
    """collate_fn for datasets whose ``__getitems__`` already returns a batch."""
    return batch


def seeded_subset(dataset, n: int | None, seed: int):
    """The first `n` of a seeded permutation (all of it when n is falsy)."""
    if not n or n >= len(dataset):
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n]
    return dataset.subset(order.sort().values)


def image_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] units of uint8 images (N, C, H, W)."""
    x = images.float() / 255
    return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).clamp(min=1e-3).tolist()
