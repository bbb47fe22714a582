"""`instdisc export`: the trained encoder for use outside this project, in one of two
formats.

- ``program`` (the default): a torch.export program that plain torch loads,
  ``torch.export.load(path).module()``. It takes (B, C, H, W) images in [0, 1], any
  batch size, any H and W from `smallest_side` to 4x the training side; the
  normalisation is inside, and it computes in inference mode (batch-norm statistics
  fixed). By default it is the backbone (what downstream tasks fine-tune); with
  ``head=True`` the whole encoder, whose unit embeddings are what the run's bank held
  and its kNN scored. The file carries ``instdisc.json`` (what the program takes and
  gives), which `instdisc eval` reads to refuse what it cannot score.
- ``torchvision``: the backbone's weights in torchvision's key names, with the
  normalisation beside them (`trainer.torchvision_file`), for fine-tuning in
  ``torchvision.models.resnet*`` at any resolution.

`load_export` reads either back as a module and its metadata.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import torch
from torch.fx.experimental import _config as shape_config

from trainer import torchvision_file
from trainer.checkpoint import load_encoder
from trainer.config import ConfigError
from trainer.models import ExportedBackbone, min_image_size

METADATA = "instdisc.json"
# The largest side a program takes, in training sides.
MAX_SCALE = 4


class NotAnExport(ValueError):
    """The file is not an encoder that `instdisc export` wrote."""


def smallest_side(arch: str, cifar_stem: bool, trained_side: int) -> int:
    """The smallest image side an export takes: the backbone's, or the training side
    where that is smaller (the images it was trained on are always taken)."""
    return min(min_image_size(arch, cifar_stem), trained_side)


def export_encoder(checkpoint_dir: str | Path, path: str | Path, head: bool = False) -> Path:
    """Write the checkpoint's encoder as a torch.export program (module docstring)."""
    encoder, trained_side = load_encoder(checkpoint_dir)
    # Channels-last convolutions make torch specialise on feature maps of side 1 (it picks
    # their layout by size), so one program could not take sides that give them and
    # sides that do not.
    encoder.in_memory_format(torch.contiguous_format)
    smallest, largest = smallest_side(encoder.arch, encoder.cifar_stem, trained_side), MAX_SCALE * trained_side
    example = torch.rand(2, encoder.in_channels, trained_side, trained_side)
    module = encoder.eval() if head else ExportedBackbone(encoder).eval()
    side = {"min": smallest, "max": largest}
    dynamic = (
        {0: torch.export.Dim("batch"), 2: torch.export.Dim("height", **side), 3: torch.export.Dim("width", **side)},
    )
    # Without it, torch specialises on feature maps of side 1 in the contiguity checks too
    # (their strides are ambiguous); the convolutions compute the same either way.
    with shape_config.patch(backed_size_oblivious=True):
        program = torch.export.export(module, (example,), dynamic_shapes=dynamic)
    metadata = {
        "format": 2,
        "arch": encoder.arch,
        "in_channels": encoder.in_channels,
        "image_size": trained_side,
        "min_image_size": smallest,
        "max_image_size": largest,
        "output": "embedding" if head else "backbone",
        "features": encoder.dim if head else encoder.feature_dim,
    }
    path = Path(path)
    with open(path, "wb") as fh:  # a file object: torch.export then skips its file-name check
        torch.export.save(program, fh, extra_files={METADATA: json.dumps(metadata)})
    return path


def export_torchvision(checkpoint_dir: str | Path, path: str | Path, head: bool = False) -> tuple[Path, str]:
    """Write the checkpoint's backbone in torchvision's format: (the file, how the
    backbone differs from torchvision's constructor, or "")."""
    if head:
        raise ConfigError(
            "--head with --format torchvision: torchvision's ResNet has no place for the projection head; "
            "the torchvision format is the backbone (drop --head, or use --format program)"
        )
    encoder, trained_side = load_encoder(checkpoint_dir)
    return torchvision_file.write(encoder, trained_side, path)


def load_export(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """(a module that computes the export's output in inference mode, its metadata: arch, in_channels, image_size,
    min_image_size, max_image_size (None: no bound), output, features) for either
    format; NotAnExport says what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise NotAnExport(f"--encoder {path}: no such file")
    if _is_torch_save_archive(path):
        return _load_torchvision(path)
    extra = {METADATA: ""}
    try:
        with open(path, "rb") as fh:
            program = torch.export.load(fh, extra_files=extra)
    except Exception as error:  # torch says why in its own words; ours names the file
        raise NotAnExport(f"--encoder {path} is not a torch.export program ({type(error).__name__}: {error})") from None
    if not extra[METADATA]:
        raise NotAnExport(
            f"--encoder {path} is a torch.export program but not an instdisc export (no {METADATA} in "
            "it); write one with `instdisc export CHECKPOINT FILE`"
        )
    metadata = json.loads(extra[METADATA])
    if metadata["format"] == 1:  # traced at one side only
        metadata.update(min_image_size=metadata["image_size"], max_image_size=metadata["image_size"])
    return program.module(), metadata


def _is_torch_save_archive(path: Path) -> bool:
    """Whether `path` is a zip that torch.save wrote (a torch.export program is a zip too)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/data.pkl") for name in archive.namelist())


def _load_torchvision(path: Path) -> tuple[torch.nn.Module, dict]:
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise NotAnExport(f"--encoder {path}: torch.load cannot read it ({type(error).__name__}: {error})") from None
    if not torchvision_file.is_ours(saved):
        raise NotAnExport(
            f"--encoder {path} is a torch.save file but not an instdisc export (no format "
            f"{torchvision_file.FORMAT!r} in it); write one with `instdisc export CHECKPOINT FILE --format torchvision`"
        )
    encoder = torchvision_file.encoder_of(saved)
    metadata = {
        "format": saved["format"],
        "arch": saved["arch"],
        "in_channels": saved["in_channels"],
        "image_size": saved["image_size"],
        "min_image_size": smallest_side(saved["arch"], saved["cifar_stem"], saved["image_size"]),
        "max_image_size": None,
        "output": "backbone",
        "features": saved["features"],
    }
    return ExportedBackbone(encoder).eval(), metadata
