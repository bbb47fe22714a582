"""A run's folder: a new one by default, and what an existing one tells before Ray starts
(the checkpoint that rerunning its name would resume, and whether that can work).

Ray Train resumes a run name from the latest checkpoint in ``<storage>/<name>/``; the
worker checks it again (`trainer.resume.restore`), but only after Ray and the bank have
started. What the files show is refused here first, once, and a bank of another shard
count than the run's is resharded here, before the shards start.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from trainer import checkpoint
from trainer.resume import CannotResume, dataset_words

log = logging.getLogger(__name__)

RUNS = Path("runs")
CONFIG_FILE = "config.yaml"  # the resolved config, in a run's folder


def new_run_dir(runs: Path = RUNS) -> Path:
    """``runs/<start time>``, never an existing folder: a run without --output-dir starts
    afresh and leaves every earlier run alone."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder, n = runs / stamp, 1
    while folder.exists():
        n += 1
        folder = runs / f"{stamp}-{n}"
    return folder


def latest_checkpoint(storage: str, run_name: str) -> Path | None:
    """The newest ``epoch-*`` checkpoint folder Ray Train keeps for `run_name` in a local
    `storage` (None for none, or a URI: those are checked by the workers alone)."""
    if "://" in storage:
        return None
    folders = sorted(Path(storage, run_name).glob("epoch-*/" + checkpoint.FILE))
    return folders[-1].parent if folders else None


def check_resumable(found: Path, dataset: dict) -> dict:
    """The checkpoint in `found`'s state, when it was trained on `dataset` (this run's
    fingerprint); CannotResume otherwise, saying why and what to do."""
    state = checkpoint.load(found)
    trained_on = state.get("dataset")
    if trained_on is not None and trained_on["sha256"] != dataset["sha256"]:
        raise CannotResume(
            f"cannot resume {found}: it was trained on another dataset ({dataset_words(trained_on)}) than this "
            f"run reads ({dataset_words(dataset)}); resume with the same data.*, or leave out --output-dir "
            "(a new run folder) or give another --name"
        )
    return state


def bank_for_resume(found: Path, snapshots: str, tag: str, shards: int, rows_dim_dtype: tuple) -> None:
    """Make the run's bank folder `snapshots` hold snapshot `tag` (the checkpoint's, in
    `found`) in `shards` shards before they start: as it is when it has that many, else
    resharded (`bank_server.reshard`) into a new folder that takes its place, the old
    one kept beside it. CannotResume when a shard's snapshot is missing or damaged, or
    its rows, dim and dtype are not this run's `rows_dim_dtype`."""
    from bank_server.errors import BankError
    from bank_server.reshard import reshard, source_layout

    folder = Path(snapshots)
    resharded = folder.with_name(f".{folder.name}.{shards}-shards")
    if not folder.exists() and resharded.exists():  # a resume that stopped between its two renames
        resharded.rename(folder)
        log.info(f"bank: {folder} is the {shards}-shard bank an earlier resume resharded")
    try:
        trained, *stored = source_layout(snapshots, tag)
        if tuple(stored) != tuple(rows_dim_dtype):
            raise CannotResume(
                f"cannot resume {found}: its bank snapshot {tag!r} in {snapshots} holds {stored[0]:,} rows x "
                f"{stored[1]} {stored[2]}, this run needs {rows_dim_dtype[0]:,} x {rows_dim_dtype[1]} "
                f"{rows_dim_dtype[2]} (training images x model.dim, bank.dtype); resume with the run's own "
                "settings, or start a new run"
            )
        if trained == shards:
            return
        kept = folder.with_name(f"{folder.name}.{trained}-shards-{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.rmtree(resharded, ignore_errors=True)  # one that a failure left behind: never used
        done = reshard(folder, resharded, shards, tag=tag)
        folder.rename(kept)
        resharded.rename(folder)
    except (BankError, OSError) as error:
        raise CannotResume(
            f"cannot resume {found}: its bank snapshot {tag!r} in {snapshots} cannot be used ({error}); "
            "start a new run (leave out --output-dir, or give another --name)"
        ) from None
    log.info(
        f"bank resharded {trained} -> {shards} shards ({done.rows:,} rows, {done.seconds:.1f} s); "
        f"the {trained}-shard bank is kept in {kept}"
    )
