"""A run's folder: a new one by default, and what an existing one tells before Ray starts
(the checkpoint that rerunning its name would resume, and whether that can work).

Ray Train resumes a run name from the latest checkpoint in ``<storage>/<name>/``; the
worker checks it again (`trainer.resume.restore`), but only after Ray and the bank have
started. What the files show is refused here first, once.
"""

from __future__ import annotations

import time
from pathlib import Path

from bank_server.snapshot import snapshot_path
from trainer import checkpoint
from trainer.resume import CannotResume, dataset_words

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


def check_resumable(found: Path, dataset: dict, snapshots: str | None, shards: int) -> dict:
    """The checkpoint in `found`'s state, when resuming it can work: it was trained on
    `dataset` (this run's fingerprint), and where the bank's snapshots are on this
    machine (`snapshots`: the run's folder of them; None when the bank is not the run's
    own or its folder is on each shard's node), every shard's snapshot of its step is
    there. CannotResume otherwise, saying why and what to do."""
    state = checkpoint.load(found)
    trained_on = state.get("dataset")
    if trained_on is not None and trained_on["sha256"] != dataset["sha256"]:
        raise CannotResume(
            f"cannot resume {found}: it was trained on another dataset ({dataset_words(trained_on)}) than this "
            f"run reads ({dataset_words(dataset)}); resume with the same data.*, or leave out --output-dir "
            "(a new run folder) or give another --name"
        )
    if snapshots is not None:
        missing = [s for s in range(shards) if not snapshot_path(snapshots, s, state["bank_snapshot"]).exists()]
        if missing:
            raise CannotResume(
                f"cannot resume {found}: its bank snapshot {state['bank_snapshot']!r} is missing for shard(s) "
                f"{', '.join(map(str, missing))} of bank.shards={shards} in {snapshots}; resume with the "
                "bank.shards it was trained with, or start a new run"
            )
    return state
