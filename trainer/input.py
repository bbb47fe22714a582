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
from trainer.streaming import StreamedInput


class Input(Protocol):
    """A worker's view of the dataset. Batches are ``(uint8 images (B, C, H, W), global
    indices (B,), labels (B,))``; an image's global index is its bank row."""

    rows: int  # training images: the bank's size
    test_rows: int
    channels: int
    side: int  # images are side x side
    num_classes: int
    form: str  # how it is read, for the driver's log: "in memory", "streamed from ..."

    def batches_per_epoch(self) -> int:
        """Steps per epoch, the same on every worker."""

    def epoch_batches(self, epoch: int) -> Iterator:
        """This worker's batches of ``train.batch_size // world`` for `epoch`, in an order
        that is a function of ``train.seed`` and `epoch` alone (a resume replays it)."""

    def share(self, split: str, batch: int) -> Iterator:
        """This worker's share of ``"train"`` or ``"test"`` in batches of `batch`; the
        workers' shares together hold every row once."""

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


@dataclass(frozen=True)
class DataShape:
    """What the launch checks before anything starts: rows, image shape, classes."""

    train_rows: int
    test_rows: int
    channels: int
    side: int
    num_classes: int
    form: str
    fingerprint: dict  # the training data's, as a checkpoint stores it

    def describe(self) -> str:
        return (
            f"{self.train_rows:,} train / {self.test_rows:,} test images, {self.channels}x{self.side}x{self.side}, "
            f"{self.num_classes} classes, {self.form}"
        )


def describe(config: Config) -> DataShape:
    """The dataset's shape for the driver, read as one worker would (a streamed dataset:
    from its files' metadata and one decoded image)."""
    data = open_input(config, 0, 1)
    return DataShape(
        data.rows, data.test_rows, data.channels, data.side, data.num_classes, data.form, data.fingerprint()
    )
