"""How long a run is, and its learning rate at each step: pure functions.

A run is a number of optimizer steps: ``train.epochs`` whole epochs when it is > 0,
otherwise ``train.steps`` (the default, so that small datasets train as long as large
ones). Epochs are ``ceil(steps / steps_per_epoch)``, the last one cut short when the
steps end inside it. The schedule runs over the run's own
length, so a run cut to a number of steps still ends its cosine at zero, and step
milestones (in epochs) fall at the same step whichever way the length was given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class RunLength:
    steps_per_epoch: int  # full batches of one epoch (the last partial batch is dropped)
    steps: int  # optimizer steps of the whole run

    @property
    def epochs(self) -> int:
        return math.ceil(self.steps / self.steps_per_epoch)

    def steps_in_epoch(self, epoch: int) -> int:
        """Steps of the 0-based `epoch`: all of its batches, or what is left of the run."""
        return max(0, min(self.steps_per_epoch, self.steps - epoch * self.steps_per_epoch))

    def describe(self) -> str:
        last = self.steps_in_epoch(self.epochs - 1)
        which = "the last one " if self.epochs > 1 else ""
        cut = "" if last == self.steps_per_epoch else f", {which}cut to {last:,} steps"
        return (
            f"{self.steps:,} steps = {self.epochs} epoch{'s' if self.epochs != 1 else ''} of "
            f"{self.steps_per_epoch:,} steps{cut}"
        )


def run_length(train_rows: int, batch_size: int, epochs: int, steps: int = 0) -> RunLength:
    """The run's length: `epochs` epochs if > 0, else `steps` optimizer steps. One epoch
    is floor(train_rows / batch_size) steps, whatever the number of workers (each takes
    floor(rows / workers) images in batches of batch_size / workers)."""
    per_epoch = train_rows // batch_size
    if per_epoch < 1:
        raise ValueError(f"train.batch_size={batch_size} exceeds the {train_rows} training images")
    return RunLength(per_epoch, epochs * per_epoch if epochs > 0 else steps)


def length_given_by(epochs: int, steps: int) -> str:
    """Which key set the run's length, for the line a run prints at start."""
    if epochs > 0:
        return f"train.epochs={epochs}" + (f"; train.steps={steps} not used" if steps > 0 else "")
    return f"train.steps={steps}"


def learning_rate(
    base_lr: float, epoch: float, epochs: float, schedule: str, milestones=(120, 160), gamma: float = 0.1
) -> float:
    """At (fractional) `epoch` of a run `epochs` long (fractional too when train.steps
    cuts the last epoch): ``step``: base_lr x gamma for each milestone passed (the
    paper's x0.1 at 120 and 160); ``cosine``: base_lr x (1 + cos(pi epoch / epochs)) / 2."""
    if schedule == "cosine":
        return base_lr * 0.5 * (1 + math.cos(math.pi * min(epoch / epochs, 1.0)))
    if schedule == "step":
        return base_lr * gamma ** sum(epoch >= m for m in milestones)
    raise ValueError(f"unknown schedule {schedule!r}")


def lr_at_step(base_lr: float, step: int, length: RunLength, schedule: str, milestones=(120, 160)) -> float:
    """The learning rate of optimizer step `step` (0-based) of a run of `length`."""
    per_epoch = length.steps_per_epoch
    return learning_rate(base_lr, step / per_epoch, length.steps / per_epoch, schedule, milestones)
