"""A shard folder that holds update-log segments but no LATEST: recovered from the log
alone when the log starts from the seeded rows, refused by name otherwise (never
started over silently), unless --allow-fresh."""

import subprocess
import sys

import numpy as np
import pytest

from bank_server import snapshot as snapshots
from bank_server import update_log
from bank_server.recovery import RecoveryRefused, open_logged
from bank_server.shard import Layout
from tests.bank_server.test_update_log import D, N, rows, updates


def test_a_log_from_the_seeded_rows_is_replayed_without_latest(tmp_path):
    layout = Layout(1, 2, N, D, "float16")
    shard, _ = open_logged(layout, tmp_path, seed=5, fsync="always")
    updates(shard, 12)
    live = rows(shard).copy()
    shard.log.close()
    snapshots.latest_path(tmp_path, 1).unlink()

    again, recovery = open_logged(layout, tmp_path, seed=0)  # another --seed: the log's own is used
    np.testing.assert_array_equal(rows(again), live)
    assert recovery.records_replayed == 12 and "no LATEST" in recovery.describe()
    # LATEST names the recovered timeline again, so the next start needs no guessing.
    pointer = snapshots.read_latest(tmp_path, 1)
    assert (pointer["tag"], pointer["seed"], pointer["log"], pointer["from"]) == (None, 5, 1, 0)
    updates(again, 3, seed=1, first=100)
    live = rows(again).copy()
    again.log.close()
    third, recovery = open_logged(layout, tmp_path, seed=0)
    np.testing.assert_array_equal(rows(third), live)
    assert recovery.records_replayed == 15
    third.log.close()


def after_a_snapshot_without_latest(tmp_path, layout) -> np.ndarray:
    """A shard folder whose log starts after a snapshot (the seeded segment pruned), LATEST deleted."""
    shard, _ = open_logged(layout, tmp_path, seed=0)
    updates(shard, 4)
    shard.snapshot(tmp_path, "epoch-1")
    updates(shard, 4, seed=2, first=10)
    live = rows(shard).copy()
    shard.log.close()
    snapshots.latest_path(tmp_path, 0).unlink()
    assert update_log.segment_numbers(snapshots.shard_dir(tmp_path, 0))[0] > 1
    return live


def test_a_log_that_continues_a_missing_segment_is_refused_by_name(tmp_path):
    layout = Layout(0, 1, N, D, "float32")
    after_a_snapshot_without_latest(tmp_path, layout)
    folder = snapshots.shard_dir(tmp_path, 0)
    with pytest.raises(
        RecoveryRefused,
        match=rf"{folder} holds update-log segment\(s\) .* but no LATEST.*"
        r"continues segment 1, which is missing.*refusing to serve",
    ):
        open_logged(layout, tmp_path, seed=0)
    assert update_log.segment_numbers(folder)  # nothing was deleted
    shard, recovery = open_logged(layout, tmp_path, seed=0, allow_fresh=True)
    assert "--allow-fresh" in recovery.describe()
    shard.log.close()


def test_a_restored_timeline_without_latest_is_refused(tmp_path):
    layout = Layout(0, 1, N, D, "float32")
    shard, _ = open_logged(layout, tmp_path, seed=0)
    updates(shard, 2)
    shard.snapshot(tmp_path, "epoch-1")
    shard.restore_in_place(tmp_path, "epoch-1")  # a new generation, from the snapshot
    shard.snapshot(tmp_path, "epoch-2")  # prunes the segments before the Restore's
    shard.log.close()
    snapshots.latest_path(tmp_path, 0).unlink()
    with pytest.raises(RecoveryRefused, match=r"no LATEST.*(starts from snapshot 'epoch-1'|continues segment)"):
        open_logged(layout, tmp_path, seed=0)


def test_the_server_exits_2_naming_the_folder_and_serves_with_allow_fresh(tmp_path, spawn_server):
    layout = Layout(0, 1, N, D, "float32")
    after_a_snapshot_without_latest(tmp_path, layout)
    args = [
        sys.executable,
        "-m",
        "bank_server",
        "--shard-id",
        "0",
        "--num-shards",
        "1",
        "--rows",
        str(N),
        "--dim",
        str(D),
        "--dtype",
        "float32",
        "--port",
        "0",
        "--snapshot-dir",
        str(tmp_path),
    ]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"{snapshots.shard_dir(tmp_path, 0)} holds update-log segment(s)" in done.stderr
    assert "but no LATEST" in done.stderr and "--allow-fresh" in done.stderr
    server = spawn_server(*args[3:], "--allow-fresh")
    server.wait_serving(120)


def test_a_latest_naming_the_seeded_rows_without_a_log_starts_over_and_keeps_what_snapshots_need(tmp_path):
    # The explicit way to start a shard from its seed while keeping its snapshots (what a
    # test forcing a resume does instead of deleting LATEST): LATEST says "seed, no log".
    layout = Layout(0, 1, N, D, "float32")
    live = after_a_snapshot_without_latest(tmp_path, layout)
    saved, _, _ = snapshots.read(tmp_path, 0, "epoch-1")
    snapshots.write_latest(tmp_path, 0, None, None, 0, seed=0)
    shard, recovery = open_logged(layout, tmp_path, seed=0)
    assert recovery.records_replayed == 0 and not np.array_equal(rows(shard), live)
    pointer = snapshots.read_latest(tmp_path, 0)  # now names the new segment, so its updates are recovered
    assert (pointer["tag"], pointer["log"]) == (None, shard.log.segment)
    shard.restore_in_place(tmp_path, "epoch-1")  # the snapshot and the log it needs are still there
    np.testing.assert_array_equal(rows(shard), saved)
    shard.log.close()
