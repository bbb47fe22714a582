"""Weighted kNN (Wu et al. 2018, sec. 3.4): pure functions over tensors.

A test feature's k nearest bank rows (cosine) vote for their class with weight
exp(sim / sigma); the bank is the index, so the neighbours come from the shards'
merged top-k and nothing here moves the bank.
"""

from __future__ import annotations

import torch


def weighted_knn_scores(similarities: torch.Tensor, neighbor_labels: torch.Tensor, num_classes: int,
                        sigma: float = 0.07) -> torch.Tensor:
    """Class scores (B, C) from neighbour similarities (B, k) and their labels (B, k)."""
    weights = torch.exp(similarities.float() / sigma)
    scores = torch.zeros(similarities.shape[0], num_classes, dtype=torch.float32, device=similarities.device)
    return scores.scatter_add_(1, neighbor_labels.long(), weights)


def correct_at(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> list[int]:
    """How many rows have their label among the top-k scores, for each k."""
    ranked = scores.topk(max(ks), dim=1).indices
    hits = ranked == labels[:, None]
    return [int(hits[:, :k].any(dim=1).sum()) for k in ks]
