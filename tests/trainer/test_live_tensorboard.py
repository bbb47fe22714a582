"""The run's TensorBoard writer, in this process, read back by TensorBoard's own reader."""

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from trainer.live_tensorboard import EventWriter


def points(folder, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(folder))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def progress(step: int, loss: float) -> dict:
    return {"step": step, "loss": loss, "lr": 0.1, "images_per_sec": 100.0, "bank_rtt_ms": 2.0}


def epoch(step: int, top1: float) -> dict:
    return {"step": step, "knn_top1": top1, "knn_top5": 1.0, "loss": 1.0, "refresh_seconds": float("nan")}


def test_points_are_on_disk_after_each_call_and_a_restart_replaces_what_followed_its_checkpoint(tmp_path):
    first = EventWriter(str(tmp_path))
    first.start(0)
    first.epoch(epoch(0, 0.5))
    for step in (4, 8):
        first.progress(progress(step, 3.0))
    first.epoch(epoch(8, 0.6))  # the checkpoint's step
    first.progress(progress(12, 3.0))  # then the attempt dies, its writer left open
    assert [s for s, _ in points(tmp_path, "train/loss")] == [4, 8, 12]  # flushed, not yet closed
    assert "epoch/refresh_seconds" not in EventAccumulator(str(tmp_path)).Reload().Tags()["scalars"]  # NaN: none

    again = EventWriter(str(tmp_path))  # a resume from the checkpoint at step 8
    again.start(9)
    for step in (12, 16):
        again.progress(progress(step, 2.0))
    again.epoch(epoch(16, 0.7))
    again.close()
    assert points(tmp_path, "train/loss") == [(4, 3.0), (8, 3.0), (12, 2.0), (16, 2.0)]
    assert [s for s, _ in points(tmp_path, "knn/top1")] == [0, 8, 16]
