"""`instdisc export`: the trained encoder as a torch.export program, loadable with plain
torch: ``torch.export.load(path).module()``.

By default the program is the backbone (what downstream tasks fine-tune); with
``head=True`` it is the whole encoder, whose unit embeddings are what the run's bank
held and its kNN scored. Either way the file carries ``instdisc.json`` (what the
program takes and gives), which `instdisc eval` reads to refuse what it cannot score.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from trainer.checkpoint import load_encoder
from trainer.models import ExportedBackbone

METADATA = "instdisc.json"


class NotAnExport(ValueError):
    """The file is not an encoder that `instdisc export` wrote."""


def export_encoder(
    checkpoint_dir: str | Path, path: str | Path, image_size: int | None = None, head: bool = False
) -> Path:
    """The program takes (B, C, S, S) images in [0, 1], S the training side unless
    `image_size` says otherwise; the batch size is free."""
    encoder, trained_side = load_encoder(checkpoint_dir)
    side = image_size or trained_side
    example = torch.rand(2, encoder.in_channels, side, side)
    module = encoder.eval() if head else ExportedBackbone(encoder).eval()
    program = torch.export.export(module, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    metadata = {
        "format": 1,
        "arch": encoder.arch,
        "in_channels": encoder.in_channels,
        "image_size": side,
        "output": "embedding" if head else "backbone",
        "features": encoder.dim if head else encoder.feature_dim,
    }
    path = Path(path)
    with open(path, "wb") as fh:  # a file object: torch.export then skips its file-name check
        torch.export.save(program, fh, extra_files={METADATA: json.dumps(metadata)})
    return path


def load_export(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """(the program as a module, its metadata); NotAnExport says what is wrong."""
    extra = {METADATA: ""}
    try:
        with open(path, "rb") as fh:
            program = torch.export.load(fh, extra_files=extra)
    except FileNotFoundError:
        raise NotAnExport(f"--encoder {path}: no such file") from None
    except Exception as error:  # torch says why in its own words; ours names the file
        raise NotAnExport(f"--encoder {path} is not a torch.export program ({type(error).__name__}: {error})") from None
    if not extra[METADATA]:
        raise NotAnExport(
            f"--encoder {path} is a torch.export program but not an instdisc export (no {METADATA} in "
            "it); write one with `instdisc export CHECKPOINT FILE`"
        )
    return program.module(), json.loads(extra[METADATA])
