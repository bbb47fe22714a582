"""A run's step statistics: what the progress lines, each epoch's metrics and the
per-step TensorBoard scalars (`step_log`) are made of. No torch work beyond adding the
loss on its device: it is read back only when a line is due."""

from __future__ import annotations

import time

import torch


class Meter:
    """Sums over the current epoch's steps (loss, bank round trip, wait for the bank), and
    `step_log`: one entry per progress line, with means since the line before."""

    def __init__(self, batch_size: int, log_every: int, step_log: list[dict] = ()):
        self.batch_size, self.log_every = batch_size, log_every
        self.step_log = list(step_log)
        self.start_epoch(0, None)

    def start_epoch(self, steps: int, device) -> None:
        self.steps, self.done = steps, 0
        self.loss_sum = torch.zeros((), device=device)  # on the device: read back only when logged
        self.rtt_sum = self.wait_sum = 0.0
        self.start = time.perf_counter()
        self._mark = (0, 0.0, 0.0)  # (steps, loss sum, seconds) at the last progress line

    def add(self, loss: torch.Tensor, round_trip_s: float, waited_s: float) -> None:
        self.loss_sum += loss
        self.rtt_sum += round_trip_s
        self.wait_sum += waited_s
        self.done += 1

    def line_due(self) -> bool:
        return self.done % self.log_every == 0

    def progress(self, step: int, lr: float, steps_left: int) -> str:
        """The progress line's figures (means over the epoch so far, and the run's ETA at
        this pace); records `step_log`'s entry for global `step`."""
        elapsed, loss_sum = time.perf_counter() - self.start, float(self.loss_sum)
        per_step = elapsed / self.done
        window = self.done - self._mark[0]
        self.step_log.append(
            {
                "step": step,
                "loss": (loss_sum - self._mark[1]) / window,
                "lr": lr,
                "images_per_sec": window * self.batch_size / (elapsed - self._mark[2]),
                "bank_rtt_ms": 1e3 * self.rtt_sum / self.done,
            }
        )
        self._mark = (self.done, loss_sum, elapsed)
        return (
            f"step {self.done}/{self.steps} | {self.batch_size / per_step:,.0f} img/s | "
            f"loss {loss_sum / self.done:.4f} | lr {lr:.4f} | bank rtt {1e3 * self.rtt_sum / self.done:.1f} ms "
            f"(waited {1e3 * self.wait_sum / self.done:.1f} ms) | ETA {duration(steps_left * per_step)}"
        )

    def epoch(self) -> dict:
        """The epoch's metrics, means over its steps."""
        seconds = time.perf_counter() - self.start
        return {
            "loss": float(self.loss_sum) / self.done,
            "epoch_seconds": seconds,
            "images_per_sec": self.done * self.batch_size / seconds,
            "bank_rtt_ms": 1e3 * self.rtt_sum / self.done,
            "bank_wait_ms": 1e3 * self.wait_sum / self.done,
        }


def duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s"
