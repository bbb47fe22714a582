"""What a train worker reads, as one interface (`Input`), and the one place the config
picks its form: `open_input` opens a streamed Parquet dataset (`trainer.streaming`) or
one held in memory (`trainer.data`); everything after that talks to `Input` alone.

The modules below, each the owner of one thing, import downward only:
``input`` -> ``data`` (in-memory datasets by name) and ``streaming`` (Parquet streamed)
-> ``parquet`` (the Parquet files: index, reading, decoding) -> ``images`` (what every
kind shares).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from trainer.config import Config
from trainer.data import MemoryInput
from trainer.images import BadImages
from trainer.streaming import StreamedInput


class Input(Protocol):
    """A worker's view of the dataset. Batches are ``(uint8 images (B, C, H, W), global
    indices (B,), labels (B,))``; an image's global index is its bank row."""

    rows: int  # training images: the bank's size
    test_rows: int  # 0 without an evaluation split
    test_split: str | None  # the evaluation split's name: test, val, valid, validation; None: there is none
    channels: int
    side: int  # images are side x side
    # 0: the train split is unlabelled, its labels all trainer.images.NO_LABEL.
    num_classes: int
    unevaluated: str | None  # why kNN and the linear probe are skipped; None: they run
    source_size: tuple[int, int] | None  # (width, height) of the first image as stored; None: not decoded
    form: str  # how it is read, for the driver's log: "in memory", "streamed from ..."
    # data.on_bad_image's record: `skipped`, the images left out (where each is).
    bad: BadImages

    def batches_per_epoch(self) -> int:
        """Steps per epoch, the same on every worker."""

    def epoch_batches(self, epoch: int, skip: int = 0) -> Iterator:
        """This worker's batches of ``train.batch_size // world`` for `epoch`, in an order
        that is a function of ``train.seed`` and `epoch` alone, after the first `skip`
        (the steps a mid-epoch checkpoint had taken: a resume goes on with the same batches)."""

    def share(self, split: str, batch: int) -> Iterator:
        """This worker's share of ``"train"`` or ``"test"`` (the evaluation split; nothing
        without one) in batches of `batch`; the workers' shares together hold every row
        once, less the images data.on_bad_image=skip leaves out."""

    def labels_at(self, indices: torch.Tensor) -> torch.Tensor:
        """The training labels of global indices, in their shape."""

    def stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std in [0, 1] units, for normalisation."""

    def fingerprint(self) -> dict:
        """What identifies the training data; a checkpoint stores it, a resume compares
        its ``sha256``."""


def streamed(config: Config) -> bool:
    return config.data.name == "parquet" and config.data.stream


def open_input(config: Config, rank: int, world: int, on_gpu: bool = False) -> Input:
    """Worker `rank` of `world`'s input; `on_gpu` sets the default decoding processes of
    a streamed dataset."""
    return StreamedInput(config, rank, world, on_gpu) if streamed(config) else MemoryInput(config, rank, world)


# A source image's shorter side this many times data.image_size or more: say that a larger
# data.image_size would keep more of it.
MUCH_LARGER = 2


@dataclass(frozen=True)
class DataShape:
    """What the launch checks before anything starts, and says of the data."""

    train_rows: int
    test_rows: int
    test_split: str | None
    channels: int
    side: int
    num_classes: int
    unevaluated: str | None
    source_size: tuple[int, int] | None
    form: str
    fingerprint: dict  # the training data's, as a checkpoint stores it

    def describe(self) -> str:
        """One line: rows and splits, image size, classes, how it is read, what is not evaluated."""
        rows = f"{self.train_rows:,} train / {self.test_rows:,} {self.test_split} images"
        if not self.test_split:
            rows = f"{self.train_rows:,} train images, no evaluation split"
        classes = f"{self.num_classes} classes" if self.num_classes else "no labels"
        parts = [rows, self.image_size(), classes, self.form]
        if self.unevaluated:
            parts.append(f"kNN and the linear probe skipped: {self.unevaluated}")
        return ", ".join(parts)

    def image_size(self) -> str:
        """The size it trains at; for decoded images, when they are much larger, that
        data.image_size keeps more of them."""
        trained = f"{self.channels}x{self.side}x{self.side}"
        if self.source_size is None:
            return trained
        width, height = self.source_size
        line = f"images {width}x{height} trained at {trained}"
        if min(width, height) >= MUCH_LARGER * self.side:
            line += f" (a larger data.image_size, up to {min(width, height)}, keeps more of them)"
        return line


def describe(config: Config) -> DataShape:
    """The dataset's shape for the driver, read as one worker would (a streamed dataset:
    from its files' metadata and one image's header)."""
    data = open_input(config, 0, 1)
    return DataShape(
        data.rows,
        data.test_rows,
        data.test_split,
        data.channels,
        data.side,
        data.num_classes,
        data.unevaluated,
        data.source_size,
        data.form,
        data.fingerprint(),
    )
