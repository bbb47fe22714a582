"""The step statistics behind the progress lines (and their TensorBoard points) and the
history's rows."""

import re

import pytest
import torch

from trainer.meter import Meter


def run_row(meter, losses, first_step, lines, figures, steps_total=7):
    meter.start_stretch("cpu")
    for t, loss in enumerate(losses):
        meter.add(torch.tensor(loss), round_trip_s=0.010, waited_s=0.002)
        step = first_step + t
        if meter.line_due(step):
            line, numbers = meter.progress(step, lr=0.5, steps_left=steps_total - step)
            lines.append(line)
            figures.append(numbers)
    meter.end_stretch()
    meter.paused(0.5)  # a pause between rows: not training time
    return meter.row()


def test_lines_come_every_log_every_steps_of_the_run_across_rows():
    meter = Meter(batch_size=32, log_every=2)
    lines, figures = [], []
    first = run_row(meter, [4.0, 2.0, 1.0], 1, lines, figures)  # 3-step rows: lines at steps 2, 4 and 6
    second = run_row(meter, [3.0, 5.0, 7.0], 4, lines, figures)
    assert len(lines) == 3
    assert [e["step"] for e in figures] == [2, 4, 6]
    # Means since the line before, across the rows' boundary: (4 + 2) / 2, (1 + 3) / 2, (5 + 7) / 2.
    assert [e["loss"] for e in figures] == [3.0, 2.0, 6.0]
    assert "loss 2.0000" in lines[1] and "lr 0.5000" in lines[1] and "bank rtt 10.0 ms (waited 2.0 ms)" in lines[1]
    assert all(e["images_per_sec"] > 0 and e["bank_rtt_ms"] == pytest.approx(10.0) for e in figures)
    assert first["loss"] == pytest.approx(7 / 3) and second["loss"] == 5.0
    assert first["bank_wait_ms"] == pytest.approx(2.0) and first["images_per_sec"] > 0
    assert first["seconds"] < 0.5 and meter.seconds_per_step() < 0.5 / 6  # the pauses are not counted


def seconds_of(progress: tuple[str, dict]) -> int:
    minutes, seconds = re.search(r"ETA (\d+)m(\d+)s", progress[0]).groups()
    return 60 * int(minutes) + int(seconds)


def test_the_eta_counts_the_pauses_in_the_share_of_the_time_they_took_so_far():
    meter = Meter(batch_size=8, log_every=1)
    meter.start_stretch("cpu")
    meter.add(torch.tensor(1.0), 0.0, 0.0)
    meter.end_stretch()
    meter.paused(1000.0)  # pauses have taken 1000 s after 1 step
    meter.start_stretch("cpu")
    meter.add(torch.tensor(1.0), 0.0, 0.0)
    # 10 steps left: their training (microseconds here), and their share of the pauses,
    # 1000 s per 2 steps so far: 5000 s.
    eta = seconds_of(meter.progress(2, 0.1, steps_left=10))
    assert eta == pytest.approx(10 * meter.seconds_per_step() + 5000, abs=1.5)
    meter.add(torch.tensor(1.0), 0.0, 0.0)
    assert seconds_of(meter.progress(3, 0.1, steps_left=0)) == 0
