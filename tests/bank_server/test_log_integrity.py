"""The update log's edges, in process on real files: torn against corrupt last records,
segments whose creation a crash cut short, a log written for another layout, a failed
fdatasync, and a folder of snapshots without LATEST."""

import errno
import logging
import os

import numpy as np
import pytest

from bank_server import snapshot as snapshots
from bank_server import update_log
from bank_server.errors import DataLoss, Unavailable
from bank_server.recovery import RecoveryRefused, open_logged
from bank_server.shard import Layout, Shard
from tests.bank_server.test_update_log import D, N, rows, segment_files, updates


def logged(tmp_path, count, layout=None):
    """A shard's folder holding `count` logged updates (no snapshot: LATEST names the
    seeded rows and segment 1); returns the rows and the last segment."""
    layout = layout or Layout(0, 1, N, D, "float32")
    shard, _ = open_logged(layout, tmp_path, seed=0)
    updates(shard, count)
    live = rows(shard).copy()
    shard.log.close()
    return live, segment_files(tmp_path)[-1]


def record_offsets(path):
    offsets = []
    offset = update_log._header_size(path)
    data = path.read_bytes()
    while offset < len(data):
        offsets.append(offset)
        offset += update_log._FRAME.size + update_log._FRAME.unpack_from(data, offset)[0]
    return offsets


# -- torn or corrupt --


def test_a_whole_last_record_with_a_bad_checksum_is_corruption_named_by_file_and_offset(tmp_path):
    layout = Layout(0, 1, N, D, "float32")
    _, path = logged(tmp_path, 3)
    last = record_offsets(path)[-1]
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # a row byte of the last record: its frame lies whole in the file
    path.write_bytes(bytes(data))
    with pytest.raises(
        update_log.LogCorrupt,
        match=rf"{path}: bad record #2 at byte {last} \(checksum mismatch\)"
        r".*frame lies whole",
    ):
        update_log.read_records(path, D, np.float32, lambda record: None)
    with pytest.raises(RecoveryRefused, match=rf"{path}: bad record #2 at byte {last}"):
        open_logged(layout, tmp_path, seed=0)
    assert path.read_bytes() == bytes(data)  # nothing cut off


def test_a_bad_last_record_followed_by_zeros_is_corruption_too(tmp_path):
    _, path = logged(tmp_path, 3)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data) + bytes(64))
    with pytest.raises(update_log.LogCorrupt, match="bad record #2"):
        update_log.read_records(path, D, np.float32, lambda record: None)


@pytest.mark.parametrize("tear", ["cut short", "frame cut short", "zeros after it"])
def test_a_record_cut_short_by_the_end_of_the_file_or_zeros_is_torn_and_dropped(tmp_path, tear):
    layout = Layout(0, 1, N, D, "float32")
    _, path = logged(tmp_path, 3)
    offsets = record_offsets(path)
    size = path.stat().st_size
    if tear == "cut short":  # the payload its length announces runs past the end
        os.truncate(path, size - 5)
        expected = 2
    elif tear == "frame cut short":  # not even the frame's 8 bytes
        os.truncate(path, offsets[-1] + 3)
        expected = 2
    else:  # the file grew but the data never came: zeros from a record's start on
        with open(path, "ab") as fh:
            fh.write(bytes(100))
        expected = 3
    scan = update_log.read_records(path, D, np.float32, lambda record: None)
    assert scan.records == expected and scan.torn_bytes > 0
    shard, recovery = open_logged(layout, tmp_path, seed=0)
    assert recovery.records_replayed == expected and "torn last record" in recovery.describe()
    shard.log.close()


# -- a segment whose creation a crash cut short --


@pytest.mark.parametrize("content", [b"", update_log.MAGIC[:5], update_log.MAGIC + b"\x40\x00\x00\x00\x00\x00"])
def test_a_segment_whose_header_a_crash_cut_short_is_removed_and_the_shard_starts(tmp_path, content, caplog):
    layout = Layout(0, 1, N, D, "float32")
    live, last = logged(tmp_path, 3)
    folder = last.parent
    torn = update_log.segment_path(folder, update_log.segment_numbers(folder)[-1] + 1)
    torn.write_bytes(content)  # O_CREAT happened, the header write (or its fsync) did not
    with caplog.at_level(logging.WARNING, logger="bank_server.recovery"):
        shard, recovery = open_logged(layout, tmp_path, seed=0)
    try:
        assert f"removed {torn}" in recovery.describe() and "cut its creation short" in recovery.describe()
        assert f"removed {torn}" in caplog.text
        np.testing.assert_array_equal(rows(shard), live)
        assert update_log.read_header(shard.log.path)["previous"] == 1  # the timeline goes on from segment 1
    finally:
        shard.log.close()


def test_a_torn_segment_that_latest_names_is_not_removed_but_refused(tmp_path):
    layout = Layout(0, 1, N, D, "float32")
    _, last = logged(tmp_path, 2)
    last.write_bytes(b"")  # LATEST names segment 1: removing it would lose what LATEST says is there
    with pytest.raises(RecoveryRefused, match=rf"{last}: header cut short"):
        open_logged(layout, tmp_path, seed=0)
    assert last.exists()


def snapshotted(tmp_path) -> tuple[Layout, object]:
    """A one-shard bank with two logged updates and snapshot 'epoch-1', its log closed:
    (its layout, its shard folder)."""
    layout = Layout(0, 1, N, D, "float32")
    shard, _ = open_logged(layout, tmp_path, seed=0)
    updates(shard, 2)
    shard.snapshot(tmp_path, "epoch-1")
    shard.log.close()
    return layout, snapshots.shard_dir(tmp_path, 0)


def test_new_segments_leave_no_temporary_header_files(tmp_path):
    _, folder = snapshotted(tmp_path)
    assert not list(folder.glob(".*tmp*"))
    header = update_log.read_header(segment_files(tmp_path)[-1])
    assert (header["total_rows"], header["num_shards"], header["dim"]) == (N, 1, D)


# -- a log written for another layout --


@pytest.mark.parametrize(
    "other, mismatch",
    [
        (Layout(0, 1, 2 * N, D, "float32"), rf"total_rows: log {N} vs shard {2 * N}"),
        (Layout(0, 2, N, D, "float32"), r"num_shards: log 1 vs shard 2"),
    ],
)
def test_a_log_written_for_another_layout_is_refused_naming_file_and_mismatch(tmp_path, other, mismatch):
    _, path = logged(tmp_path, 3)  # LATEST names the seeded rows: no snapshot's layout to check
    assert snapshots.read_latest(tmp_path, 0)["tag"] is None
    with pytest.raises(RecoveryRefused, match=rf"log segment {path} was written for another layout \(.*{mismatch}"):
        open_logged(other, tmp_path, seed=0)


def test_every_chained_segment_is_checked_not_only_the_first(tmp_path):
    layout = Layout(0, 1, N, D, "float32")
    _, first = logged(tmp_path, 2, layout)
    # A segment continuing the timeline but written for another --rows (as a restart with
    # another layout would have done before segments recorded it).
    other = update_log.UpdateLog(first.parent, Layout(0, 1, N + 1, D, "float32"), "no", previous=1)
    second = other.path
    other.close()
    with pytest.raises(
        RecoveryRefused,
        match=rf"log segment {second} was written for another layout "
        rf"\(total_rows: log {N + 1} vs shard {N}\)",
    ):
        open_logged(layout, tmp_path, seed=0)


# -- a failed fdatasync --


def test_a_failed_fdatasync_breaks_the_log_the_caller_gets_data_loss_and_updates_are_refused(tmp_path, monkeypatch):
    layout = Layout(0, 1, N, D, "float32")
    shard, _ = open_logged(layout, tmp_path, seed=0, fsync="always")
    updates(shard, 2)

    def failing(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", failing)  # the disk's answer, not the log's
    with pytest.raises(DataLoss, match="fdatasync of the update log .* failed"):
        updates(shard, 1, seed=5, first=3)
    monkeypatch.undo()
    before = rows(shard).copy()
    with pytest.raises(Unavailable, match="updates are refused"):
        updates(shard, 1, seed=6, first=4)
    np.testing.assert_array_equal(rows(shard), before)  # the refused update changed nothing
    with pytest.raises(DataLoss, match="broken"):
        shard.log.sync()  # a later fsync does not pretend the failed one's pages are safe
    shard.log.close()  # logs instead of raising, closes its fd once
    assert shard.log._fd == -1
    again, recovery = open_logged(layout, tmp_path, seed=0)
    assert recovery.records_replayed == 3  # what reached the kernel is recovered
    again.log.close()


# -- snapshots without LATEST or log --


def test_snapshots_without_latest_or_log_start_fresh_with_a_warning_naming_them(tmp_path, caplog):
    layout, folder = snapshotted(tmp_path)
    snapshots.latest_path(tmp_path, 0).unlink()
    for path in segment_files(tmp_path):
        path.unlink()
    with caplog.at_level(logging.WARNING, logger="bank_server.recovery"):
        fresh, recovery = open_logged(layout, tmp_path, seed=0)
    try:
        warned = [r for r in caplog.records if r.levelno == logging.WARNING and "epoch-1.arrow" in r.getMessage()]
        assert warned and str(folder) in warned[0].getMessage()
        assert "epoch-1.arrow" in recovery.describe()
        np.testing.assert_array_equal(rows(fresh), rows(Shard.create(layout, seed=0)))
    finally:
        fresh.log.close()
