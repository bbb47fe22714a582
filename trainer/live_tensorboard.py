"""The run's TensorBoard event files, written while it trains: a point per progress line
and per epoch (the untrained epoch 0 included), in ``<output-dir>/tensorboard``.

The output folder is the driver's, and rank 0 may run on another node. So the files are
written by a small named Ray actor that the launch pins to the driver's node
(`start_event_writer`), and rank 0 sends it each point without waiting for the answer
(`EventSender`): a step never waits for TensorBoard, and a writer that fails is logged
once while training goes on. The writer flushes after each call, so a point is on disk
as soon as the actor has it.

A start of the train loop from a checkpoint at step S (a resume, or Ray Train's restart
of the workers) may find points after S in the files, written by the attempt that went
on past that checkpoint. Its writer opens a new file with ``purge_step=S + 1``:
TensorBoard's reader drops the earlier files' points at or after that step, so each
step is on the curves once, from the attempt that got to the end.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from trainer.config import ConfigError

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"  # in the output folder

# The run's scalars under these tags; the x axis is the optimizer step.
TENSORBOARD_STEP_TAGS = {
    "loss": "train/loss",
    "lr": "train/lr",
    "images_per_sec": "train/images_per_sec",
    "bank_rtt_ms": "train/bank_rtt_ms",
}
TENSORBOARD_EPOCH_TAGS = {
    "knn_top1": "knn/top1",
    "knn_top5": "knn/top5",
    "loss": "epoch/loss",
    "images_per_sec": "epoch/images_per_sec",
    "bank_rtt_ms": "epoch/bank_rtt_ms",
    "eval_seconds": "epoch/eval_seconds",
    "refresh_seconds": "epoch/refresh_seconds",
}


def require_tensorboard() -> None:
    """Found missing before the training it would have written up, not after."""
    try:
        import tensorboard  # noqa: F401
    except ImportError as error:
        raise ConfigError(f"TensorBoard is not installed ({error}); pip install tensorboard") from None


class EventWriter:
    """Owns the run's event file; a named Ray actor on the driver's node."""

    def __init__(self, folder: str):
        self._folder = folder
        self._writer = None

    def start(self, first_step: int) -> None:
        """The train loop (re)starts, its first point at `first_step`: earlier points at or
        after it are dropped (the module docstring says why)."""
        # TensorBoard's own writer, not torch's SummaryWriter: this process then never
        # loads torch, which would cost every run a second of CPU and its memory.
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self.close()
        self._writer = EventFileWriter(self._folder)
        # What SummaryWriter(purge_step=...) writes: the reader purges the points of
        # earlier files at or after this step.
        self._writer.add_event(Event(step=first_step, session_log=SessionLog(status=SessionLog.START)))
        self._writer.flush()

    def progress(self, entry: dict) -> None:
        """One progress line's figures (`Meter.progress`'s dict)."""
        self._add(entry, TENSORBOARD_STEP_TAGS)

    def epoch(self, metrics: dict) -> None:
        """One epoch's metrics (a `history` entry); an epoch not evaluated has no kNN point."""
        self._add(metrics, TENSORBOARD_EPOCH_TAGS)

    def _add(self, values: dict, tags: dict[str, str]) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        if self._writer is None:
            raise RuntimeError("a point before start(): the train loop tells the writer where it starts first")
        points = [
            Summary.Value(tag=tag, simple_value=float(values[key]))
            for key, tag in tags.items()
            if values.get(key) is not None and not math.isnan(values[key])
        ]
        self._writer.add_event(Event(wall_time=time.time(), step=int(values["step"]), summary=Summary(value=points)))
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def start_event_writer(output: Path, name: str):
    """The run's `EventWriter` actor, named `name`, on this (the driver's) node, which
    holds `output`. Call with Ray initialised; `ray.kill` it at the end."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return (
        ray.remote(EventWriter)
        .options(name=name, num_cpus=0, scheduling_strategy=here)
        .remote(str(output / TENSORBOARD_DIR))
    )


class EventSender:
    """Rank 0's side of the `EventWriter` named `name` (None: sends nothing, as on other
    ranks). Each call returns at once; the answers are looked at on the next call, and
    the first failure is logged and ends the sending: training goes on."""

    def __init__(self, name: str | None):
        self._writer, self._pending = None, []
        if name is None:
            return
        import ray

        try:
            self._writer = ray.get_actor(name)
        except ValueError as error:
            self._give_up(error)

    def start(self, first_step: int) -> None:
        self._send("start", first_step)

    def progress(self, entry: dict) -> None:
        self._send("progress", entry)

    def epoch(self, metrics: dict) -> None:
        self._send("epoch", metrics)

    def finish(self, timeout: float = 30.0) -> None:
        """Wait for the calls still in flight: the run's last points must not be lost with
        this process when the loop returns."""
        self._answers(timeout)
        if self._pending:
            log.warning(f"TensorBoard events: {len(self._pending)} call(s) unanswered in {timeout:g} s")

    def _send(self, method: str, *args) -> None:
        self._answers(0.0)
        if self._writer is not None:
            self._pending.append(getattr(self._writer, method).remote(*args))

    def _answers(self, timeout: float) -> None:
        """Look at the answers that came within `timeout` seconds (0: those already here)."""
        if not self._pending:
            return
        import ray

        done, self._pending = ray.wait(
            self._pending, num_returns=len(self._pending), timeout=timeout, fetch_local=False
        )
        for ref in done:
            try:
                ray.get(ref)
            except ray.exceptions.RayError as error:
                self._give_up(error)
                return

    def _give_up(self, error: Exception) -> None:
        log.warning(f"TensorBoard events: the writer failed, no more points in this start: {error}")
        self._writer, self._pending = None, []
