"""What every dataset kind shares: images as uint8 (C, H, W) tensors, random-access
datasets that yield ``(image, index, label)`` and fetch whole batches, the one resize
rule, and the error for files that are not there.

Every dataset fetches whole batches (``__getitems__``), so a DataLoader with
``collate_fn=batch_as_is`` hands over stacked tensors without per-image collation.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

STATS_IMAGES = 512  # images the normalisation statistics are taken from, when not all are in memory


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

    def subset(self, indices) -> InMemoryImages:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return InMemoryImages(self.images[idx], self.labels[idx], self.num_classes)


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

    def subset(self, indices) -> DecodedImages:
        idx = [int(i) for i in indices]
        return DecodedImages(lambda j, load=self._load: load(idx[j]), self.labels[idx], self.num_classes, self.size)


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
