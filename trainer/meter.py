"""A run's step statistics: what the progress lines (and their TensorBoard points) and
each epoch's metrics are made of. No torch work beyond adding the
loss on its device: it is read back only when a line is due."""

from __future__ import annotations

import time

import torch


class _Sums:
    """Loss, bank round trip and wait for the bank over some steps, and their seconds."""

    def __init__(self, device):
        self.loss = torch.zeros((), device=device)  # on the device: read back only when logged
        self.rtt = self.wait = self.seconds = 0.0
        self.steps = 0

    def add(self, loss: torch.Tensor, round_trip_s: float, waited_s: float) -> None:
        self.loss += loss
        self.rtt += round_trip_s
        self.wait += waited_s
        self.steps += 1


class Meter:
    """Sums over the current epoch's steps (the epoch's metrics) and over the steps since
    the last progress line, which may span epochs (the line's figures); and the run's
    pace for the ETA: seconds per step, and the seconds that the work between epochs'
    steps (bank refresh, evaluation, checkpoint) has taken so far."""

    def __init__(self, batch_size: int, log_every: int):
        self.batch_size, self.log_every = batch_size, log_every
        self.between_s: list[float] = []  # one entry per pause between steps, this start
        self._steps_s, self._steps = 0.0, 0  # this start's earlier epochs
        self._window = _Sums(None)
        self.start_epoch(None)

    def start_epoch(self, device) -> None:
        self._epoch = _Sums(device)
        self._window.loss = self._window.loss.to(device)
        self.start = self._since = time.perf_counter()

    def add(self, loss: torch.Tensor, round_trip_s: float, waited_s: float) -> None:
        self._epoch.add(loss, round_trip_s, waited_s)
        self._window.add(loss, round_trip_s, waited_s)

    def paused(self, seconds: float) -> None:
        """Count `seconds` of work between steps (the warm start and the untrained
        encoder's evaluation, or an epoch's refresh, evaluation and checkpoint)."""
        self.between_s.append(seconds)

    def line_due(self, step: int) -> bool:
        """Whether global step `step` (1-based, over the whole run) ends a progress line."""
        return step % self.log_every == 0

    def progress(self, step: int, lr: float, steps_left: int, pauses_left: int) -> tuple[str, dict]:
        """The progress line at global `step`, and its figures (means since the line
        before) as a dict; the line adds the run's ETA: `steps_left` at this start's pace
        plus `pauses_left` pauses between epochs at their mean so far."""
        now = time.perf_counter()
        w = self._window
        seconds = w.seconds + now - self._since
        loss = float(w.loss) / w.steps
        entry = {
            "step": step,
            "loss": loss,
            "lr": lr,
            "images_per_sec": w.steps * self.batch_size / seconds,
            "bank_rtt_ms": 1e3 * w.rtt / w.steps,
        }
        per_step = (self._steps_s + now - self.start) / (self._steps + self._epoch.steps)
        pause = sum(self.between_s) / len(self.between_s) if self.between_s else 0.0
        eta = steps_left * per_step + pauses_left * pause
        line = (
            f"{entry['images_per_sec']:,.0f} img/s | loss {loss:.4f} | lr {lr:.4f} | bank rtt "
            f"{entry['bank_rtt_ms']:.1f} ms (waited {1e3 * w.wait / w.steps:.1f} ms) | ETA {duration(eta)}"
        )
        self._window, self._since = _Sums(w.loss.device), now
        return line, entry

    def epoch(self) -> dict:
        """The epoch's metrics, means over its steps."""
        now = time.perf_counter()
        seconds, e = now - self.start, self._epoch
        self._steps_s, self._steps = self._steps_s + seconds, self._steps + e.steps
        self._window.seconds += now - self._since
        return {
            "loss": float(e.loss) / e.steps,
            "epoch_seconds": seconds,
            "images_per_sec": e.steps * self.batch_size / seconds,
            "bank_rtt_ms": 1e3 * e.rtt / e.steps,
            "bank_wait_ms": 1e3 * e.wait / e.steps,
        }


def duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s"
