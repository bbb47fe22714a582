"""Weighted kNN (Wu et al. 2018, sec. 3.4): pure functions over tensors.

A test feature's k nearest train features (cosine) vote for their class with weight
exp(sim / sigma). The neighbours come either from the bank (the shards' merged top-k,
`BankFeed.topk`) or from train features held in memory (`knn_correct`, chunked);
either way the counting below is the same, and nothing here moves the bank.
"""

from __future__ import annotations

import torch

CHUNK = 512  # test queries scored against the train features at once: bounds the (chunk, N) similarities


def weighted_knn_scores(
    similarities: torch.Tensor, neighbor_labels: torch.Tensor, num_classes: int, sigma: float = 0.07
) -> torch.Tensor:
    """Class scores (B, C) from neighbour similarities (B, k) and their labels (B, k)."""
    weights = torch.exp(similarities.float() / sigma)
    scores = torch.zeros(similarities.shape[0], num_classes, dtype=torch.float32, device=similarities.device)
    return scores.scatter_add_(1, neighbor_labels.long(), weights)


def correct_at(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> list[int]:
    """How many rows have their label among the top-k scores, for each k."""
    ranked = scores.topk(max(ks), dim=1).indices
    hits = ranked == labels[:, None]
    return [int(hits[:, :k].any(dim=1).sum()) for k in ks]


def neighbours_correct(
    similarities: torch.Tensor, neighbor_labels: torch.Tensor, labels: torch.Tensor, num_classes: int, sigma: float
) -> tuple[int, int]:
    """How many queries (B,) their neighbours (B, k) classify right, at top-1 and top-5."""
    scores = weighted_knn_scores(similarities, neighbor_labels.to(similarities.device), num_classes, sigma)
    c1, c5 = correct_at(scores, labels.to(scores.device), (1, min(5, num_classes)))
    return c1, c5


def knn_correct(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    k: int,
    sigma: float,
) -> tuple[int, int]:
    """How many test features (M, D) the weighted kNN against the train features (N, D)
    gets right, at top-1 and top-5; unit features, so the dot product is the cosine."""
    correct1 = correct5 = 0
    for begin in range(0, len(test_features), CHUNK):
        sims, idx = (test_features[begin : begin + CHUNK] @ train_features.T).topk(k, dim=1)  # (chunk, k)
        c1, c5 = neighbours_correct(sims, train_labels[idx], test_labels[begin : begin + CHUNK], num_classes, sigma)
        correct1, correct5 = correct1 + c1, correct5 + c5
    return correct1, correct5


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    k: int,
    sigma: float,
) -> tuple[float, float]:
    """Weighted kNN top-1 and top-5 of the test features against the train features."""
    correct1, correct5 = knn_correct(train_features, train_labels, test_features, test_labels, num_classes, k, sigma)
    return correct1 / len(test_features), correct5 / len(test_features)
