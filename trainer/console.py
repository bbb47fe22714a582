"""Where the trainer's lines go. Every module logs to its own logger
(``logging.getLogger(__name__)``, all under ``trainer``); the `instdisc` command and
each train worker route them to the console here, once per process.

Lines go to sys.stdout (errors to sys.stderr) as they are when the line is written, so
a caller that redirects them (a benchmark's log file, a test's capture) gets the
lines. On a train worker they are written to the streams, never through print():
Ray Train patches print() to log *and* echo, which showed every line twice; Ray
forwards the worker's streams to the driver's console.
"""

from __future__ import annotations

import logging
import sys

ROOT = "trainer"
_LEVEL_WORDS = {logging.WARNING: "WARNING: ", logging.ERROR: "error: ", logging.CRITICAL: "error: "}


class _Console(logging.Handler):
    def __init__(self, prefix: str = ""):
        super().__init__()
        self.prefix = prefix

    def format(self, record: logging.LogRecord) -> str:
        return f"{self.prefix}{_LEVEL_WORDS.get(record.levelno, '')}{record.getMessage()}"

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr if record.levelno >= logging.ERROR else sys.stdout
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)


def _install(logger: logging.Logger, handler: logging.Handler) -> bool:
    """Add `handler` unless this process already gave the logger one of ours."""
    if any(getattr(h, "instdisc", False) for h in logger.handlers):
        return False
    handler.instdisc = True
    logger.addHandler(handler)
    return True


def show_lines() -> None:
    """The driver's console (`instdisc`): the trainer's INFO lines and up."""
    logger = logging.getLogger(ROOT)
    if _install(logger, _Console()):
        logger.setLevel(logging.INFO)


def show_worker_lines(rank: int) -> None:
    """A train worker's console. Rank 0 says the run's lines (progress, epochs, the
    resume); every worker says its own warnings, with its rank. The training loop's own
    warnings are the same on every worker (they follow all-reduced figures): rank 0's
    only."""
    logger = logging.getLogger(ROOT)
    if not _install(logger, _Console("[instdisc] " if rank == 0 else f"[instdisc rank {rank}] ")):
        return
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.propagate = False  # not twice: Ray Train configures the root logger of its workers
    if rank != 0:
        logging.getLogger(f"{ROOT}.train").setLevel(logging.ERROR)
    # The bank client's own lines (a shard unreachable, and reachable again), on stderr:
    # without a handler, Python would print the WARNING bare and drop the INFO.
    client = logging.getLogger("bank_server.client")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[instdisc rank {rank}] %(levelname)s %(message)s"))
    if _install(client, handler):
        client.setLevel(logging.INFO)
        client.propagate = False


_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def quiet_ray_workers() -> None:
    """Runs in every Ray worker process (Ray's `worker_process_setup_hook`), so it lives
    here, where importing it costs nothing: without the dashboard, Ray Train's
    placement-group cleaner warns every second or two that it cannot query state."""
    logging.getLogger(_CLEANER_LOGGER).setLevel(logging.ERROR)
    try:  # this one logs every reported metric at INFO, under a logger named by its file path
        from ray.train.v2._internal.execution import context

        logging.getLogger(context.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass
