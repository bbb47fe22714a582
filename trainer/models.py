"""Encoders: a backbone, a linear head to a D-dim embedding, L2 normalisation.

`small` is a fast CPU default; `resnet18` / `resnet50` are torchvision's, with an
optional CIFAR stem (3x3 stride-1 first conv, no max-pool) for small images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models as tv_models

ARCHES = ("small", "resnet18", "resnet50")


def _small_backbone(in_channels: int, width: int) -> tuple[nn.Sequential, int]:
    """Three 3x3 conv-BN-ReLU stages, each followed by a 2x2 max-pool, then the
    flattened 3x3 map (28x28 input; any input is pooled to 3x3 first). Keeping
    the spatial layout, instead of a global average, matters for small centred
    images; about 3.3k train images/s on 2 CPU cores at 28x28, width 32."""

    def stage(cin, cout):
        return [
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        ]

    w = width
    net = nn.Sequential(
        *stage(in_channels, w), *stage(w, 2 * w), *stage(2 * w, 4 * w), nn.AdaptiveAvgPool2d(3), nn.Flatten()
    )
    return net, 4 * w * 9


def _resnet_backbone(arch: str, in_channels: int, cifar_stem: bool) -> tuple[nn.Module, int]:
    net = getattr(tv_models, arch)(weights=None)
    if cifar_stem:
        net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    out = net.fc.in_features
    net.fc = nn.Identity()
    return net, out


def min_image_size(arch: str, cifar_stem: bool) -> int:
    """Smallest input side the backbone still maps to at least one spatial cell."""
    if arch == "small":
        return 8
    return 8 if cifar_stem else 32


class Encoder(nn.Module):
    """x (B, C, H, W) in [0, 1] -> unit embedding (B, dim).

    Input normalisation is part of the module, so the exported backbone takes raw
    [0, 1] images too; so is the layout the convolutions run in (channels-last, or
    `in_memory_format`'s).
    `backbone` (with the normalisation) is what `export` keeps.
    """

    def __init__(
        self,
        arch: str = "small",
        in_channels: int = 1,
        dim: int = 128,
        width: int = 32,
        cifar_stem: bool = True,
        mean=None,
        std=None,
    ):
        super().__init__()
        if arch not in ARCHES:
            raise ValueError(f"model.arch must be one of {ARCHES}, got {arch!r}")
        self.arch, self.cifar_stem, self.in_channels, self.dim, self.width = arch, cifar_stem, in_channels, dim, width
        self.register_buffer("mean", torch.tensor(mean or [0.5] * in_channels).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std or [0.25] * in_channels).view(1, -1, 1, 1))
        if arch == "small":
            self.backbone, features = _small_backbone(in_channels, width)
        else:
            self.backbone, features = _resnet_backbone(arch, in_channels, cifar_stem)
        self.head = nn.Linear(features, dim)
        self.feature_dim = features
        # Channels-last convolutions: faster on CPU as on GPU (BENCHMARKS.md, decisions).
        self.in_memory_format(torch.channels_last)

    def in_memory_format(self, memory_format: torch.memory_format) -> Encoder:
        """Run the convolutions, weights and input, in `memory_format`; returns self."""
        self.memory_format = memory_format
        return self.to(memory_format=memory_format)

    def check_input(self, size: int) -> None:
        """ValueError if images of side `size` are too small for this backbone."""
        need = min_image_size(self.arch, self.cifar_stem)
        if size < need:
            raise ValueError(
                f"model.arch={self.arch} (cifar_stem={self.cifar_stem}) needs images of at least "
                f"{need}x{need} pixels, the dataset gives {size}x{size}; pick another model.arch "
                "or set data.image_size"
            )

    def spec(self) -> dict:
        """Constructor arguments, so a checkpoint can rebuild the module."""
        return {
            "arch": self.arch,
            "in_channels": self.in_channels,
            "dim": self.dim,
            "width": self.width,
            "cifar_stem": self.cifar_stem,
            "mean": self.mean.flatten().tolist(),
            "std": self.std.flatten().tolist(),
        }

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features (B, feature_dim), before the head: what downstream tasks use."""
        return self.backbone(((x - self.mean) / self.std).contiguous(memory_format=self.memory_format))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.features(x)), dim=1)


class ExportedBackbone(nn.Module):
    """The encoder without its head: [0, 1] images -> backbone features."""

    def __init__(self, encoder: Encoder):
        super().__init__()
        self.register_buffer("mean", encoder.mean.clone())
        self.register_buffer("std", encoder.std.clone())
        self.backbone = encoder.backbone
        self.memory_format = encoder.memory_format

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(((x - self.mean) / self.std).contiguous(memory_format=self.memory_format))
