"""Pure merges of per-shard answers into whole-bank answers (numpy, no I/O)."""

from __future__ import annotations

import numpy as np


def merge_partition_sums(max_logits, sum_exps, weighted_sums):
    """Combine shards' ``(m_s, S_s, W_s)`` into ``(log Z, E_p[v])`` per query.

    With M = max_s m_s and c_s = exp(m_s - M):
    ``log Z = M + log sum_s c_s S_s`` and ``E_p[v] = sum_s c_s W_s / sum_s c_s S_s``,
    the softmax-weighted mean of the bank rows, so ``d log Z / d q = E_p[v] / tau``.

    Inputs are sequences over shards of arrays (B,), (B,), (B, D); outputs float64
    (B,) and float32 (B, D).
    """
    m = np.stack(max_logits).astype(np.float64)  # (S, B)
    s = np.stack(sum_exps).astype(np.float64)  # (S, B)
    w = np.stack(weighted_sums).astype(np.float64)  # (S, B, D)
    top = m.max(axis=0)  # (B,)
    c = np.exp(m - top)  # (S, B)
    total = (c * s).sum(axis=0)  # (B,)
    log_z = top + np.log(total)
    expected = (c[:, :, None] * w).sum(axis=0) / total[:, None]
    return log_z, expected.astype(np.float32)


def merge_topk(similarities, indices, k: int):
    """Whole-bank top-k from shards' top-k lists: (B, k) similarities descending and
    their global indices. Inputs are sequences over shards of (B, k_s) arrays."""
    sims = np.concatenate(similarities, axis=1)
    idx = np.concatenate(indices, axis=1)
    if sims.shape[1] > k:
        keep = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        sims = np.take_along_axis(sims, keep, axis=1)
        idx = np.take_along_axis(idx, keep, axis=1)
    order = np.argsort(-sims, axis=1, kind="stable")
    return np.take_along_axis(sims, order, axis=1), np.take_along_axis(idx, order, axis=1)
