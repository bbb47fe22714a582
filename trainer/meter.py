"""A run's step statistics: what the progress lines (and their TensorBoard points) and
the history's rows are made of. No torch work beyond adding the
loss on its device: it is read back only when a line is due."""

from __future__ import annotations

import time

import numpy as np
import torch


class _Sums:
    """Loss, bank round trip and wait for the bank over some steps, and their seconds."""

    def __init__(self, device):
        self.loss = torch.zeros((), device=device)  # on the device: read back only when logged
        self.rtt = self.wait = self.seconds = 0.0
        self.steps = 0
        self.round_trips: list[float] = []

    def add(self, loss: torch.Tensor, round_trip_s: float, waited_s: float) -> None:
        self.loss += loss
        self.rtt += round_trip_s
        self.wait += waited_s
        self.steps += 1


class Meter:
    """Sums over the steps since the last history row (its metrics) and over the steps
    since the last progress line (the line's figures), counting training time only:
    the loop trains in stretches between pauses (`start_stretch`, `end_stretch`). And
    this start's pace: seconds per training step, and the seconds its pauses (warm
    start, refresh, evaluation, checkpoint) have taken, for the ETA and the timed
    cadences."""

    def __init__(self, batch_size: int, log_every: int):
        self.batch_size, self.log_every = batch_size, log_every
        self.paused_s = 0.0  # this start's pauses between steps
        self._trained_s, self._trained_steps = 0.0, 0  # this start's closed stretches, and its steps
        self._row, self._window = _Sums(None), _Sums(None)
        self._stretch_start = self._since = None

    def start_stretch(self, device) -> None:
        self._row.loss, self._window.loss = self._row.loss.to(device), self._window.loss.to(device)
        self._stretch_start = self._since = time.perf_counter()

    def end_stretch(self) -> None:
        now = time.perf_counter()
        self._row.seconds += now - self._stretch_start
        self._window.seconds += now - self._since
        self._trained_s += now - self._stretch_start
        self._stretch_start = self._since = None

    def add(self, loss: torch.Tensor, round_trip_s: float, waited_s: float) -> None:
        self._row.add(loss, round_trip_s, waited_s)
        self._row.round_trips.append(round_trip_s)  # the row's percentiles; a line shows the mean
        self._window.add(loss, round_trip_s, waited_s)
        self._trained_steps += 1

    def paused(self, seconds: float) -> None:
        """Count `seconds` of work between steps."""
        self.paused_s += seconds

    def seconds_per_step(self) -> float | None:
        """This start's training seconds per step so far; None before any step."""
        if not self._trained_steps:
            return None
        open_s = time.perf_counter() - self._stretch_start if self._stretch_start is not None else 0.0
        return (self._trained_s + open_s) / self._trained_steps

    def line_due(self, step: int) -> bool:
        """Whether global step `step` (1-based, over the whole run) ends a progress line."""
        return step % self.log_every == 0

    def progress(self, step: int, lr: float, steps_left: int) -> tuple[str, dict]:
        """The progress line at global `step` (within a stretch), and its figures (means
        since the line before) as a dict; the line adds the run's ETA: `steps_left` at
        this start's pace, its pauses counted in the same share of the time as so far."""
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
        per_step = self.seconds_per_step()
        eta = steps_left * per_step * (1 + self.paused_s / (per_step * self._trained_steps))
        line = (
            f"{entry['images_per_sec']:,.0f} img/s | loss {loss:.4f} | lr {lr:.4f} | bank rtt "
            f"{entry['bank_rtt_ms']:.1f} ms (waited {1e3 * w.wait / w.steps:.1f} ms) | ETA {duration(eta)}"
        )
        self._window, self._since = _Sums(w.loss.device), now
        return line, entry

    def row(self) -> dict:
        """The metrics of the steps since the last row (means over them, training time
        only), which start the next."""
        r = self._row
        self._row = _Sums(r.loss.device)
        return {
            "loss": float(r.loss) / r.steps,
            "seconds": r.seconds,
            "images_per_sec": r.steps * self.batch_size / r.seconds,
            "bank_rtt_ms": 1e3 * r.rtt / r.steps,
            "bank_rtt_p50_ms": 1e3 * float(np.percentile(r.round_trips, 50)),
            "bank_rtt_p99_ms": 1e3 * float(np.percentile(r.round_trips, 99)),
            "bank_wait_ms": 1e3 * r.wait / r.steps,
        }


def duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s"
