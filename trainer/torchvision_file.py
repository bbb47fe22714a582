"""`instdisc export --format torchvision`: the backbone's weights under torchvision's key
names, for ``torchvision.models.resnet18/50(weights=None).load_state_dict(sd, strict=False)``
(only ``fc.weight`` and ``fc.bias`` missing).

The file is a dict that ``torch.load(path, weights_only=True)`` reads:

- ``state_dict``: the backbone's tensors, contiguous, in torchvision's key names;
- ``mean``, ``std``: the per-channel normalisation the encoder was trained with, in
  [0, 1] pixel units (apply it before the backbone);
- ``arch``, ``cifar_stem``, ``in_channels``, ``image_size`` (the training side),
  ``features`` (the backbone's output width);
- ``note``: how the backbone differs from what torchvision's constructor builds (a
  CIFAR stem, another channel count), with the lines that make the model match; "" when
  it does not;
- ``format``: `FORMAT`, which tells the file from other ``torch.save`` files.

This module is the one place that maps the Encoder's backbone to torchvision's keys and
back: the backbone is torchvision's own ResNet with ``fc`` replaced by an identity, so
its state dict already carries torchvision's names, minus ``fc.*``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from trainer.config import ConfigError
from trainer.models import Encoder

FORMAT = "instdisc-torchvision-1"


def differences(arch: str, cifar_stem: bool, in_channels: int) -> str:
    """How the backbone differs from ``torchvision.models.<arch>(weights=None)``, and what
    makes that model match it; "" when it is the same."""
    if not cifar_stem and in_channels == 3:
        return ""
    what = []
    if cifar_stem:
        what.append("conv1 is 3x3 with stride 1 and there is no max-pool (a CIFAR stem)")
    if in_channels != 3:
        what.append(f"conv1 takes {in_channels} input channel{'s' if in_channels != 1 else ''}, not 3")
    conv1 = f"model.conv1 = torch.nn.Conv2d({in_channels}, 64, " + ("3, 1, 1" if cifar_stem else "7, 2, 3")
    fix = f"{conv1}, bias=False)" + ("; model.maxpool = torch.nn.Identity()" if cifar_stem else "")
    return f"torchvision.models.{arch}() builds another stem: {'; '.join(what)}; before load_state_dict set {fix}"


def write(encoder: Encoder, image_size: int, path: str | Path) -> tuple[Path, str]:
    """Write `encoder`'s backbone as a torchvision-format file: (the file, its note)."""
    if not encoder.arch.startswith("resnet"):
        raise ConfigError(
            f"--format torchvision: model.arch={encoder.arch} has no torchvision counterpart; "
            "export it as a torch.export program (--format program)"
        )
    note = differences(encoder.arch, encoder.cifar_stem, encoder.in_channels)
    # Contiguous copies: the encoder's convolutions are channels-last, which a plain
    # torchvision model does not expect of the tensors it loads.
    state = {
        key: value.detach().cpu().clone(memory_format=torch.contiguous_format)
        for key, value in encoder.backbone.state_dict().items()
    }
    path = Path(path)
    torch.save(
        {
            "format": FORMAT,
            "state_dict": state,
            "mean": encoder.mean.flatten().tolist(),
            "std": encoder.std.flatten().tolist(),
            "arch": encoder.arch,
            "cifar_stem": encoder.cifar_stem,
            "in_channels": encoder.in_channels,
            "image_size": image_size,
            "features": encoder.feature_dim,
            "note": note,
        },
        path,
    )
    return path, note


def is_ours(saved) -> bool:
    return isinstance(saved, dict) and saved.get("format") == FORMAT


def encoder_of(saved: dict) -> Encoder:
    """The Encoder whose backbone holds the file's weights (its head is untrained and
    unused), in eval mode."""
    encoder = Encoder(
        saved["arch"], saved["in_channels"], cifar_stem=saved["cifar_stem"], mean=saved["mean"], std=saved["std"]
    )
    encoder.backbone.load_state_dict(saved["state_dict"])
    return encoder.eval()
