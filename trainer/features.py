"""The encoder on un-augmented train images, in a run: each worker embeds its share.

Two users: the bank fill (`fill_bank`: the warm start before training, and every
``train.refresh_bank_every`` epochs lemniscate's ``recompute_memory``), and kNN on
fresh features (`fresh_index`, ``eval.source=fresh``). Pass the bare encoder, not the
DDP wrapper: workers embed different numbers of batches here, and DDP's forward would
wait for the others' buffer broadcast.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from trainer import distributed as dist
from trainer.bank_feed import BankFeed
from trainer.images import BadImage

BATCH = 1024


@torch.no_grad()
def embed(model: torch.nn.Module, images: torch.Tensor, device) -> torch.Tensor:
    """Unit features (B, D) of uint8 images (B, C, H, W)."""
    return model(images.to(device).float().div_(255)).float()


@torch.no_grad()
def clean_features(encoder: torch.nn.Module, data, device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(bank rows, unit features) of this worker's share of the train images, by batch,
    with the encoder in eval mode (back in train mode after)."""
    encoder.eval()
    try:
        for images, idx, _ in data.share("train", BATCH):
            yield idx, embed(encoder, images, device)
    finally:
        encoder.train()


def fill_bank(encoder: torch.nn.Module, data, feed: BankFeed, device) -> float:
    """Set every bank row to the encoder's feature of its un-augmented image (momentum 0),
    all workers together; returns the seconds it took. The warm start reads every train
    image before training: an image that does not decode stops every worker here
    (StopTraining, naming it). Rows of skipped images keep what they held."""
    start = time.perf_counter()
    error = None
    try:
        for idx, features in clean_features(encoder, data, device):
            feed.write(idx, features)
    except BadImage as bad:
        error = bad
    dist.stop_if_any(error)  # also the barrier: every worker's rows are written
    return time.perf_counter() - start


def fresh_index(encoder: torch.nn.Module, data, device, dim: int) -> torch.Tensor:
    """(N, D) unit features of every train image in bank-row order, on every worker: each
    embeds its share, then all of them gather the whole. A skipped image's row is zeros
    (similarity 0 to every query)."""
    n, world, rank = data.rows, dist.world_size(), dist.rank()
    mine = torch.zeros(len(range(rank, n, world)), dim, device=device)
    error = None
    try:
        for idx, features in clean_features(encoder, data, device):
            mine[(idx.to(device) - rank) // world] = features  # worker r embeds rows r, r + W, ...
    except BadImage as bad:
        error = bad
    dist.stop_if_any(error)
    shares = dist.all_gather_rows(mine, [len(range(r, n, world)) for r in range(world)])
    index = torch.empty(n, mine.shape[1], device=device)
    for r, share in enumerate(shares):
        index[r::world] = share.to(device)  # worker r embedded rows r, r + W, ...
    return index
