"""The training checkpoint's format: one ``state.pt`` in a checkpoint folder.

Written at every checkpointed step (`trainer.cadence`) and read back by a resume (`trainer.resume`; Ray
Train keeps the folders), and read by ``instdisc export``. The file is a dict:

- ``model``, ``optimizer``: state dicts of the bare encoder and of SGD;
- ``encoder``: `Encoder.spec()`, enough to rebuild the module without the config;
- ``image_size``: the side of the training images (export's default input);
- ``epoch``, ``step``, ``epoch_step``, ``history``, ``log_z``: where training stands
  (epochs completed, steps of the run, steps taken of the epoch in progress);
- ``bank_snapshot``: the tag of the bank snapshot taken at the same step, which
  resume restores; ``bank_addresses`` where that bank served;
- ``config``, ``git_sha``: what produced it;
- ``dataset``: the training split's fingerprint (`trainer.input`: a streamed Parquet
  split's files, sizes and row counts); resume refuses another dataset.
"""

from __future__ import annotations

from pathlib import Path

import torch

FILE = "state.pt"


class NotACheckpoint(FileNotFoundError):
    """The folder holds no checkpoint; the message names it."""


def save(
    folder: str | Path,
    *,
    model: dict,
    optimizer: dict,
    encoder: dict,
    image_size: int,
    epoch: int,
    step: int,
    epoch_step: int,
    history: list,
    log_z: float | None,
    bank_snapshot: str,
    bank_addresses: list[str],
    config: dict,
    git_sha: str,
    bank_outages: list[dict],
    dataset: dict,
) -> Path:
    """Write the checkpoint file into `folder`; every field is required, by name."""
    path = Path(folder) / FILE
    torch.save(
        {
            "model": model,
            "optimizer": optimizer,
            "encoder": encoder,
            "image_size": image_size,
            "epoch": epoch,
            "step": step,
            "epoch_step": epoch_step,
            "history": history,
            "log_z": log_z,
            "bank_snapshot": bank_snapshot,
            "bank_addresses": bank_addresses,
            "config": config,
            "git_sha": git_sha,
            "bank_outages": bank_outages,
            "dataset": dataset,
        },
        path,
    )
    return path


def load(folder: str | Path, map_location="cpu") -> dict:
    path = Path(folder) / FILE
    if not path.exists():
        raise NotACheckpoint(f"{folder} is not a checkpoint folder: no {FILE} in it")
    # Our own file, with the config and history as plain Python objects.
    return torch.load(path, map_location=map_location, weights_only=False)


def load_encoder(folder: str | Path):
    """(the trained encoder in eval mode, the image side it was trained on)."""
    return encoder_of(load(folder))


def encoder_of(state: dict):
    """A loaded checkpoint's (encoder in eval mode, image side it was trained on)."""
    from trainer.models import Encoder

    encoder = Encoder(**state["encoder"])
    encoder.load_state_dict(state["model"])
    return encoder.eval(), state.get("image_size", 32)
