"""The update log and recovery, in process on real files: bit-identical replay, torn
tails, checksums, idempotent replay and retries, fuzzy snapshots, Restore timelines."""

import os
import threading

import numpy as np
import pytest

from bank_server import shard as shard_module
from bank_server import snapshot as snapshots
from bank_server import update_log
from bank_server.recovery import RecoveryRefused, open_logged, recover
from bank_server.shard import Layout, Shard

N, D = 64, 8


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def updates(shard: Shard, count: int, seed: int = 0, client: str = "c", first: int = 1):
    """`count` momentum updates of random rows of `shard` (global indices)."""
    rng = np.random.default_rng(seed)
    mine = np.arange(shard.layout.shard_id, N, shard.layout.num_shards)
    for i in range(count):
        idx = rng.choice(mine, 5, replace=False)
        assert shard.momentum_update(idx, unit(rng.standard_normal((5, D)).astype(np.float32)), 0.5, client, first + i)


def rows(shard: Shard) -> np.ndarray:
    return shard.lookup(np.arange(shard.layout.shard_id, N, shard.layout.num_shards))


def segment_files(directory, shard_id=0):
    folder = snapshots.shard_dir(directory, shard_id)
    return [update_log.segment_path(folder, n) for n in update_log.segment_numbers(folder)]


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("fsync", ["always", "everysec", "no"])
def test_replay_gives_bit_identical_rows_counters_and_retry_memory(tmp_path, dtype, fsync):
    layout = Layout(1, 2, N, D, dtype)
    shard, recovery = open_logged(layout, tmp_path, seed=3, fsync=fsync)
    assert recovery.source == "initial rows (seed 3)"
    updates(shard, 20)
    live = rows(shard).copy()
    shard.log.close()
    again, recovery = open_logged(layout, tmp_path, seed=3)
    assert recovery.records_replayed == 20 and recovery.torn_bytes_dropped == 0
    np.testing.assert_array_equal(rows(again), live)
    assert again.updates_applied == 20
    # A client's retry of an update acknowledged before the restart is applied once.
    assert not again.momentum_update([1], unit(np.ones((1, D), np.float32)), 0.5, "c", 20)
    np.testing.assert_array_equal(rows(again), live)
    again.log.close()


def test_replaying_records_twice_changes_nothing(tmp_path):
    layout = Layout(0, 1, N, D, "float16")
    shard, _ = open_logged(layout, tmp_path, seed=0)
    updates(shard, 10)
    live = rows(shard).copy()
    shard.log.close()
    replayed = Shard.create(layout, seed=0)
    for _ in range(2):
        for path in segment_files(tmp_path):
            update_log.read_records(path, D, np.float16, replayed.apply_logged)
    np.testing.assert_array_equal(rows(replayed), live)
    assert replayed.updates_applied == 10  # each (client_id, sequence) counted once


def test_a_torn_last_record_is_dropped_and_cut_off(tmp_path, caplog):
    layout = Layout(0, 1, N, D, "float32")
    shard, _ = open_logged(layout, tmp_path, seed=0)
    updates(shard, 3)
    before_last = rows(shard).copy()
    updates(shard, 1, seed=9, first=4)
    shard.log.close()
    path = segment_files(tmp_path)[-1]
    size = path.stat().st_size
    os.truncate(path, size - 7)  # a crash in the middle of writing the last record
    again, recovery = open_logged(layout, tmp_path, seed=0)
    assert recovery.records_replayed == 3 and recovery.torn_bytes_dropped > 0
    assert "torn last record" in recovery.describe()
    np.testing.assert_array_equal(rows(again), before_last)
    again.log.close()
    # Cut off for good: the segment now reads whole, and the next start finds no tear.
    assert update_log.read_records(path, D, np.float32, lambda r: None, allow_torn_tail=False).torn_bytes == 0
    _, recovery = open_logged(layout, tmp_path, seed=0)
    assert recovery.records_replayed == 3 and recovery.torn_bytes_dropped == 0


def test_a_corrupted_record_in_the_middle_refuses_naming_the_file(tmp_path):
    layout = Layout(0, 1, N, D, "float32")
    shard, _ = open_logged(layout, tmp_path, seed=0)
    updates(shard, 5)
    shard.log.close()
    path = segment_files(tmp_path)[-1]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(RecoveryRefused, match=rf"{path}.*bad record #\d+ at byte \d+ \(checksum mismatch\)"):
        recover(layout, tmp_path, seed=0)
    fresh, recovery = recover(layout, tmp_path, seed=0, allow_fresh=True)
    np.testing.assert_array_equal(rows(fresh), rows(Shard.create(layout, seed=0)))
    assert "--allow-fresh" in recovery.describe()


def test_unreadable_latest_refuses_naming_it(tmp_path):
    layout = Layout(0, 1, N, D)
    open_logged(layout, tmp_path, seed=0)[0].log.close()
    latest = snapshots.latest_path(tmp_path, 0)
    latest.write_text('{"tag": "x", "log": ')
    with pytest.raises(RecoveryRefused, match=rf"{latest} is unreadable"):
        recover(layout, tmp_path, seed=0)


def test_a_snapshot_that_fails_its_checksum_is_named_and_fallback_replays_from_the_one_before(tmp_path):
    layout = Layout(0, 1, N, D, "float16")
    shard, _ = open_logged(layout, tmp_path, seed=0)
    updates(shard, 4)
    shard.snapshot(tmp_path, "a")
    updates(shard, 4, seed=1, first=10)
    path, _, _ = shard.snapshot(tmp_path, "b")
    updates(shard, 4, seed=2, first=20)
    live = rows(shard).copy()
    shard.log.close()
    data = bytearray(path.read_bytes())
    at = data.find(rows(shard)[3].tobytes()[:8])  # inside the rows, not the Arrow framing
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(RecoveryRefused, match=rf"snapshot {path}: rows .* fail their crc32 checksum"):
        recover(layout, tmp_path, seed=0)
    again, recovery = open_logged(layout, tmp_path, seed=0, fallback=True)
    assert recovery.tag == "a" and "fell back to snapshot a" in recovery.describe()
    np.testing.assert_array_equal(rows(again), live)  # a + the log after it: nothing lost
    again.log.close()


def test_a_truncated_snapshot_is_named(tmp_path):
    layout = Layout(0, 1, N, D)
    shard, _ = open_logged(layout, tmp_path, seed=0)
    path, _, _ = shard.snapshot(tmp_path, "a")
    shard.log.close()
    os.truncate(path, path.stat().st_size // 2)
    with pytest.raises(RecoveryRefused, match=rf"snapshot {path} is truncated"):
        recover(layout, tmp_path, seed=0)


def test_a_snapshot_taken_during_updates_plus_its_log_is_exact(tmp_path, monkeypatch):
    monkeypatch.setattr(shard_module, "SNAPSHOT_BLOCK_ROWS", 4)  # many blocks, updates between them
    layout = Layout(0, 1, N, D, "float16")
    shard, _ = open_logged(layout, tmp_path, seed=0)
    done = threading.Event()

    def keep_updating():
        updates(shard, 300, seed=5, client="busy")
        done.set()

    worker = threading.Thread(target=keep_updating)
    worker.start()
    while not done.is_set():
        shard.snapshot(tmp_path, f"s{shard.updates_applied}", keep=2)
    worker.join()
    live = rows(shard).copy()
    shard.log.close()
    again, recovery = open_logged(layout, tmp_path, seed=0)
    assert recovery.tag is not None
    np.testing.assert_array_equal(rows(again), live)
    assert again.updates_applied == 300
    again.log.close()
    # A snapshot read alone is the shard when it ended: its file plus its log's first records.
    saved, metadata, _ = snapshots.read(tmp_path, 0, recovery.tag)
    np.testing.assert_array_equal(saved, rows(Shard.restore(layout, tmp_path, recovery.tag)))


def test_restore_starts_a_new_timeline_that_recovery_follows(tmp_path):
    layout = Layout(0, 1, N, D, "float32")
    shard, _ = open_logged(layout, tmp_path, seed=0)
    updates(shard, 3)
    shard.snapshot(tmp_path, "epoch-1")
    at_epoch_1 = rows(shard).copy()
    updates(shard, 3, seed=1, first=10)  # the abandoned timeline
    shard.restore_in_place(tmp_path, "epoch-1")
    np.testing.assert_array_equal(rows(shard), at_epoch_1)
    updates(shard, 2, seed=2, first=20)
    resumed = rows(shard).copy()
    shard.log.close()
    again, recovery = open_logged(layout, tmp_path, seed=0)
    np.testing.assert_array_equal(rows(again), resumed)
    assert recovery.tag == "epoch-1" and recovery.records_replayed == 2
    again.log.close()


def test_pruning_removes_log_segments_with_their_snapshots(tmp_path):
    layout = Layout(0, 1, N, D)
    shard, _ = open_logged(layout, tmp_path, seed=0)
    for i in range(4):
        updates(shard, 1, seed=i, first=i + 1)
        shard.snapshot(tmp_path, f"t{i}", keep=2)
    assert sorted(p.stem for p in snapshots.snapshots_newest_first(tmp_path, 0)) == ["t2", "t3"]
    t2 = snapshots.read_metadata(snapshots.snapshot_path(tmp_path, 0, "t2"))["log_segment"]
    assert update_log.segment_numbers(snapshots.shard_dir(tmp_path, 0)) == [t2, t2 + 1]
    live = rows(shard).copy()
    shard.log.close()
    np.testing.assert_array_equal(rows(open_logged(layout, tmp_path, seed=0)[0]), live)


def test_periodic_snapshots_are_pruned_among_themselves(tmp_path):
    shard = Shard.create(Layout(0, 1, N, D))
    for tag in ("epoch-1", "periodic-1", "periodic-2", "epoch-2", "periodic-3"):
        shard.snapshot(tmp_path, tag, keep=1, periodic_keep=2)
    left = sorted(p.stem for p in snapshots.snapshots_newest_first(tmp_path, 0))
    assert left == ["epoch-2", "periodic-2", "periodic-3"]


def test_a_latest_that_continues_past_the_end_of_its_segment_is_refused(tmp_path):
    layout = Layout(0, 1, N, D)
    shard, _ = open_logged(layout, tmp_path, seed=0)
    updates(shard, 2)
    shard.snapshot(tmp_path, "a")
    shard.log.close()
    pointer = snapshots.read_latest(tmp_path, 0)
    snapshots.write_latest(tmp_path, 0, "a", pointer["log"], pointer["from"] + 5)
    with pytest.raises(RecoveryRefused, match=r"holds 0 good records; .*LATEST continues from record 5"):
        recover(layout, tmp_path, seed=0)
