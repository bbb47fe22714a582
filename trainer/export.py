"""`instdisc export`: the trained encoder alone (head dropped) as a torch.export
program, loadable with plain torch: ``torch.export.load(path).module()``."""

from __future__ import annotations

from pathlib import Path

import torch

from trainer.checkpoint import load_encoder
from trainer.models import ExportedBackbone


def export_encoder(checkpoint_dir: str | Path, path: str | Path, image_size: int | None = None) -> Path:
    """The program takes (B, C, S, S) images in [0, 1], S the training side unless
    `image_size` says otherwise; the batch size is free."""
    encoder, trained_side = load_encoder(checkpoint_dir)
    side = image_size or trained_side
    example = torch.rand(2, encoder.in_channels, side, side)
    program = torch.export.export(ExportedBackbone(encoder).eval(), (example,),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    path = Path(path)
    with open(path, "wb") as fh:  # a file object: torch.export then skips its file-name check
        torch.export.save(program, fh)
    return path
