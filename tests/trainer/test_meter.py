"""The step statistics behind the progress lines, the epoch's metrics and TensorBoard's
per-step scalars."""

import pytest
import torch

from trainer.meter import Meter


def test_lines_report_means_so_far_and_step_log_the_means_since_the_line_before():
    meter = Meter(batch_size=32, log_every=2, step_log=[{"step": 1}])  # an entry from before a resume stays
    meter.start_epoch(4, "cpu")
    lines = []
    for t, loss in enumerate([4.0, 2.0, 1.0, 3.0]):
        meter.add(torch.tensor(loss), round_trip_s=0.010, waited_s=0.002)
        if meter.line_due():
            lines.append(meter.progress(step=10 + t + 1, lr=0.5, steps_left=6 - t))
    assert len(lines) == 2 and lines[1].startswith("step 4/4 |")
    assert "loss 2.5000" in lines[1] and "lr 0.5000" in lines[1] and "bank rtt 10.0 ms (waited 2.0 ms)" in lines[1]
    assert "img/s" in lines[1] and "ETA" in lines[1]
    assert [e["step"] for e in meter.step_log] == [1, 12, 14]
    assert [e["loss"] for e in meter.step_log[1:]] == [3.0, 2.0]  # (4 + 2) / 2, then (1 + 3) / 2
    assert all(e["images_per_sec"] > 0 and e["bank_rtt_ms"] == pytest.approx(10.0) for e in meter.step_log[1:])
    epoch = meter.epoch()
    assert epoch["loss"] == 2.5 and epoch["bank_rtt_ms"] == pytest.approx(10.0)
    assert epoch["bank_wait_ms"] == pytest.approx(2.0) and epoch["images_per_sec"] > 0
    meter.start_epoch(4, "cpu")  # a new epoch starts its sums again; the step log goes on
    meter.add(torch.tensor(7.0), 0.0, 0.0)
    assert meter.epoch()["loss"] == 7.0 and len(meter.step_log) == 3
