"""When a run pauses training for its bookkeeping: the bank refresh, kNN evaluation and
checkpoints, each counted in optimizer steps of the run (`train.refresh_bank_every`,
`eval.every`, `train.checkpoint_every`).

A fixed cadence N is due at the steps that are multiples of N, so a resumed run keeps
the uninterrupted run's. Unset, each keeps its share of the run's time small on any
dataset size:

- the refresh, every `REFRESH_EPOCHS` epochs' steps (it encodes every training image:
  about 0.4 of an epoch's training);
- evaluation, once the training since the last one has taken `1 / EVAL_SHARE` times its
  measured seconds (it never changes training, so its timing may depend on the clock);
- checkpoints, every `CHECKPOINT_MINUTES` of training at this start's pace.

Checkpoints with ``train.checkpoint_every=0`` come at epoch ends. The last step always
evaluates and checkpoints; a refresh due there comes first, so the kNN and the bank a run
leaves are of clean features. Rank 0 plans the timed cadences and every worker follows
its plan (`Cadence.agree`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from trainer import distributed as dist
from trainer.config import Config
from trainer.schedule import RunLength

REFRESH_EPOCHS = 10
EVAL_SHARE = 0.04
CHECKPOINT_MINUTES = 30
# Steps of a start before its pace is measured for the timed cadences.
PACE_STEPS = 20


@dataclass(frozen=True)
class Due:
    """What the step just taken calls for."""

    refresh: bool
    evaluate: bool
    checkpoint: bool


class Cadence:
    def __init__(self, config: Config, length: RunLength, step: int, evaluates: bool):
        self.total, self.per_epoch = length.steps, length.steps_per_epoch
        every = config.train.refresh_bank_every
        self.refresh_every = REFRESH_EPOCHS * self.per_epoch if every is None else every
        self.eval_every = config.eval.every if evaluates else None
        self.evaluates = evaluates
        self.timed_eval = evaluates and config.eval.every is None
        self.checkpoint_every = config.train.checkpoint_every
        # The timed cadences' next steps; None until planned (the pace is measured first).
        self.next_eval: int | None = None
        self.next_checkpoint: int | None = None
        self.pace_at = min(step + PACE_STEPS, self.total)
        self.last_eval_step, self.last_eval_seconds = step, None
        self.last_checkpoint_step = step

    def next_stop(self, step: int, epoch_end: int) -> int:
        """The first step after `step` at which training pauses: the epoch's end (the
        step `epoch_end`), a due cadence, the pace probe or the run's end."""
        stops = [epoch_end, self.total]
        for every in (self.refresh_every, self.eval_every, self.checkpoint_every):
            if every:
                stops.append((step // every + 1) * every)
        stops += [s for s in (self.next_eval, self.next_checkpoint) if s is not None and s > step]
        if step < self.pace_at:
            stops.append(self.pace_at)
        return min(stops)

    def due(self, step: int, epoch_ended: bool) -> Due:
        last = step >= self.total
        return Due(
            refresh=bool(self.refresh_every) and step % self.refresh_every == 0,
            evaluate=self.evaluates and (last or self._eval_due(step)),
            checkpoint=last
            or (epoch_ended if self.checkpoint_every == 0 else False)
            or (bool(self.checkpoint_every) and step % self.checkpoint_every == 0)
            or (self.checkpoint_every is None and step == self.next_checkpoint),
        )

    def _eval_due(self, step: int) -> bool:
        if self.eval_every:
            return step % self.eval_every == 0
        # Timed: as planned, or at the pace probe while the cost of one is not known yet.
        return step == self.next_eval or (self.last_eval_seconds is None and step == self.pace_at)

    def done(self, step: int, due: Due, eval_seconds: float) -> None:
        if due.evaluate:
            self.last_eval_step, self.last_eval_seconds = step, eval_seconds
        if due.checkpoint:
            self.last_checkpoint_step = step

    def agree(self, step: int, seconds_per_step: float | None) -> None:
        """Rank 0 plans the timed cadences from this start's pace (seconds per training
        step; None before any step) and every worker takes its plan: a collective."""
        plan = None
        if dist.rank() == 0 and seconds_per_step and step >= self.pace_at:
            # Never at or before this step: a pace measured slower since would put it there.
            plan = tuple(
                None if due is None else max(due, step + 1)
                for due in (self._next_eval(seconds_per_step), self._next_checkpoint(seconds_per_step))
            )
        plan = dist.broadcast_object(plan)
        if plan is not None:
            self.next_eval, self.next_checkpoint = plan

    def _next_eval(self, pace: float) -> int | None:
        if not self.timed_eval or self.last_eval_seconds is None:
            return None
        return self.last_eval_step + max(1, math.ceil(self.last_eval_seconds / (EVAL_SHARE * pace)))

    def _next_checkpoint(self, pace: float) -> int | None:
        if self.checkpoint_every is not None:
            return None
        return self.last_checkpoint_step + max(1, math.ceil(CHECKPOINT_MINUTES * 60 / pace))
