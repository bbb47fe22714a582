"""A split's images by index, for every dataset kind: what a picture of bank neighbours
shows. An image's index in the train split is its bank row.

Datasets held in memory (and ImageFolder, decoded per access) are loaded as the run's
workers load them (`trainer.data.load_splits`); a streamed Parquet split reads only the
row groups of the rows asked for (`ParquetSplit.images_at`), never anything N-sized.
An image that does not decode raises BadImage naming it: a picture has no gap to leave.
"""

from __future__ import annotations

import numpy as np
import torch

from trainer.config import Config
from trainer.data import load_splits
from trainer.images import BadImages
from trainer.input import streamed
from trainer.parquet import ParquetSplit, eval_split


class DatasetImages:
    """A random-access dataset (`trainer.images`), by index."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.num_classes = dataset.num_classes
        self.channels, self.side = dataset.image_shape

    def __len__(self) -> int:
        return len(self.dataset)

    def images_at(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 images (n, C, H, W), labels (n,)) of `indices`, in their order."""
        images, _, labels = self.dataset.__getitems__([int(i) for i in indices])
        return images, torch.as_tensor(labels).long()


class ParquetImages:
    """A streamed Parquet split, by global index."""

    def __init__(self, split: ParquetSplit, side: int):
        self.split, self.side, self.channels = split, side, 3  # `decode` makes every image RGB
        self.num_classes = split.num_classes

    def __len__(self) -> int:
        return len(self.split)

    def images_at(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.split.images_at(np.asarray(indices, dtype=np.int64), self.side)
        self.split.close()
        return torch.from_numpy(images), torch.from_numpy(labels)


def open_gallery(config: Config):
    """(train split, evaluation split or None, its name) of the data `config` names, by
    index, subsets applied as in the run."""
    d = config.data
    if streamed(config):
        split = eval_split(d.root, d.test_split)
        test = ParquetImages(ParquetSplit(d.root, split, d.test_subset), d.image_size) if split else None
        return ParquetImages(ParquetSplit(d.root, "train", d.subset), d.image_size), test, split
    train, test, split = load_splits(config, BadImages("fail"))
    return DatasetImages(train), DatasetImages(test) if test is not None else None, split
