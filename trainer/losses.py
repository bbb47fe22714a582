"""The InstDisc objectives (Wu et al., CVPR 2018, eqs. 2-4 and 7), one place.

Symbols: f (B, D) unit features of the batch; v_i (B, D) their bank rows, read
before this step's update; tau the temperature; N bank rows; K negatives shared by
the whole batch (K, D); P(j|f) = exp(v_j . f / tau) / Z.

- NCE with noise P_n = 1/N:  h(j, f) = P(j|f) / (P(j|f) + K P_n),
  loss = -log h(i, f) - sum_k log(1 - h(n_k, f)), averaged over the batch.
  Z is a constant: N * mean(exp(logits)) on the first batch (lemniscate), or an
  exponential moving average of that estimate (steadier; see HobbitLong/CMC#23).
- InfoNCE (the sampled softmax): cross-entropy over the positive and the K negatives,
  loss = -log( exp(v_i . f / tau) / (exp(v_i . f / tau) + sum_k exp(n_k . f / tau)) ),
  averaged over the batch. No Z: the K + 1 terms normalise themselves. A drawn negative
  that is the query's own row (an "accidental hit": negatives are drawn with replacement
  from all N rows, the query's included, with probability K/N per query) is left out
  of that query's sum; otherwise the positive would sit in the denominator twice and
  pull against itself. With that, negatives = all N rows gives exactly the softmax below.
- Exact full softmax:  loss = -v_i . f / tau + log Z(f), Z(f) = sum_j exp(v_j . f / tau),
  with d log Z / d f = E_p[v] / tau supplied by the bank's partition sums.

Nothing here knows about gRPC or distribution: the bank arrives as tensors or as a
`partition_fn(f) -> (log_z (B,), expected_row (B, D))`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F


def sampled_logits(f: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, tau: float):
    """(positive logits (B,), negative logits (B, K)), both v . f / tau: what NCE and
    InfoNCE score, from the positives and the K negatives shared by the batch."""
    return (f * positives).sum(1) / tau, f @ negatives.T / tau


def batch_log_z(pos_logits: torch.Tensor, neg_logits: torch.Tensor, num_rows: int) -> torch.Tensor:
    """log of lemniscate's estimate Z = N * mean(exp(logits)) over the (B, K+1) logits."""
    logits = torch.cat([pos_logits[:, None], neg_logits], dim=1).detach().double()
    return math.log(num_rows) + torch.logsumexp(logits.flatten(), 0) - math.log(logits.numel())


def nce_loss(pos_logits: torch.Tensor, neg_logits: torch.Tensor, log_z: float, num_rows: int) -> torch.Tensor:
    """NCE loss from logits (B,), (B, K), in log space:
    -log h = softplus(log(K P_n) - log P), -log(1 - h) = softplus(log P - log(K P_n))."""
    k = neg_logits.shape[1]
    log_k_pn = math.log(k / num_rows)
    loss_pos = F.softplus(log_k_pn - (pos_logits - log_z))  # (B,)
    loss_neg = F.softplus((neg_logits - log_z) - log_k_pn).sum(1)  # (B,)
    return (loss_pos + loss_neg).mean()


def infonce_loss(
    pos_logits: torch.Tensor, neg_logits: torch.Tensor, accidental_hits: torch.Tensor | None = None
) -> torch.Tensor:
    """InfoNCE from logits (B,), (B, K): mean_i (-pos_i + logsumexp([pos_i, neg_i]));
    `accidental_hits` (B, K) marks negatives that are the query's own row, left out."""
    if accidental_hits is not None:
        neg_logits = neg_logits.masked_fill(accidental_hits, float("-inf"))
    logits = torch.cat([pos_logits[:, None], neg_logits], dim=1)  # (B, 1 + K)
    return (torch.logsumexp(logits, dim=1) - pos_logits).mean()


def accidental_hits(indices: torch.Tensor, negative_indices: torch.Tensor) -> torch.Tensor:
    """(B, K) True where negative k is query b's own bank row."""
    return indices.to(negative_indices.device)[:, None] == negative_indices[None, :]


class PartitionEstimate:
    """NCE's normalising constant Z, kept as log Z.

    mode ``fixed``: set from the first batch and never changed (lemniscate);
    mode ``ema``: ``Z <- m Z + (1 - m) Z_batch`` every step.
    """

    def __init__(self, mode: str = "ema", momentum: float = 0.99, log_z: float | None = None):
        if mode not in ("fixed", "ema"):
            raise ValueError(f"loss.z_mode must be 'fixed' or 'ema', got {mode!r}")
        self.mode, self.momentum, self.log_z = mode, momentum, log_z

    def update(self, batch_estimate: float) -> float:
        if self.log_z is None or (self.mode == "ema" and self.momentum == 0):
            self.log_z = float(batch_estimate)
        elif self.mode == "ema":
            m = self.momentum
            self.log_z = float(
                torch.logaddexp(
                    torch.tensor(math.log(m) + self.log_z, dtype=torch.float64),
                    torch.tensor(math.log1p(-m) + batch_estimate, dtype=torch.float64),
                )
            )
        return self.log_z


class _LogPartition(torch.autograd.Function):
    """log Z(f) per row with the gradient E_p[v] / tau from the bank."""

    @staticmethod
    def forward(ctx, f, tau, partition_fn):
        log_z, expected = partition_fn(f.detach())
        # The bank answers on the CPU; the loss and gradient live where f does.
        ctx.save_for_backward(expected.to(f.device, f.dtype))
        ctx.tau = tau
        return log_z.to(f.device, f.dtype)

    @staticmethod
    def backward(ctx, grad):
        (expected,) = ctx.saved_tensors
        return grad[:, None] * expected / ctx.tau, None, None


def log_partition(f: torch.Tensor, tau: float, partition_fn: Callable) -> torch.Tensor:
    return _LogPartition.apply(f, tau, partition_fn)


def softmax_loss(f: torch.Tensor, positives: torch.Tensor, tau: float, partition_fn: Callable) -> torch.Tensor:
    """Exact non-parametric softmax: mean_i (-v_i . f_i / tau + log Z(f_i))."""
    return (-(f * positives).sum(1) / tau + log_partition(f, tau, partition_fn)).mean()
