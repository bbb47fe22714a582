"""Learning-rate schedules as pure functions of (fractional) epoch."""

from __future__ import annotations

import math


def learning_rate(base_lr: float, epoch: float, epochs: int, schedule: str, milestones=(120, 160),
                  gamma: float = 0.1) -> float:
    """``step``: base_lr x gamma for each milestone passed (the paper's x0.1 at 120
    and 160); ``cosine``: base_lr x (1 + cos(pi epoch / epochs)) / 2."""
    if schedule == "cosine":
        return base_lr * 0.5 * (1 + math.cos(math.pi * min(epoch / epochs, 1.0)))
    if schedule == "step":
        return base_lr * gamma ** sum(epoch >= m for m in milestones)
    raise ValueError(f"unknown schedule {schedule!r}")
