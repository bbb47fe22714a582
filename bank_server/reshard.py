"""Offline resharding: a stored bank of S shards rewritten as a new bank of N shards.

Every global index keeps exactly the bytes it had: global index g lives on shard
``g % S`` at local row ``g // S`` in the source and on ``g % N`` at ``g // N`` in the
new bank (same rows, dim and dtype).

What each source shard holds is what its folder says, read the way the shards read it:

- without a tag, what recovery would bring the shard back to (``recovery.find_walk`` and
  ``recovery.replay``: LATEST's base, then the log, a torn last record passed over);
- with a tag, snapshot `tag` as a Restore loads it (the file plus its own log segment up
  to its ``log_end``), which is what a training resume from a checkpoint naming that tag
  needs even when the bank moved on since.

The source is only read: no torn tail is cut, no segment removed, no LATEST rewritten.
Memory stays bounded by a block, not the bank: each source shard is rebuilt into a
scratch file with pwrite (the page cache holds it, not this process), then the new
shards are written together a global block at a time. A global block ``[G0, G1)``
with G0 a multiple of both S and N is a contiguous local range of every source shard
and of every new shard.

The new bank is written into a hidden sibling folder and renamed to DEST only once
whole; a failure removes it. DEST's shards each hold one snapshot, tagged `tag` (or
``resharded``), with LATEST pointing at it and no log, so ``instdisc bank serve
--snapshot-dir DEST --num-shards N ...`` recovers it and a Restore of that tag loads it.
Its metadata has ``updates_applied`` and ``rows_updated`` 0 and ``seen`` empty: the
counters and the retry memory were per old shard, and no retry spans an offline
reshard. ``resharded_from`` records the source folder, its shard count, the tag, and
what each source shard was rebuilt from.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bank_server import recovery, update_log
from bank_server import snapshot as snapshots
from bank_server.errors import DataLoss, FailedPrecondition, InvalidArgument, NotFound
from bank_server.shard import DTYPES, Layout, initial_blocks, rows_on_shard

DEFAULT_TAG = "resharded"
# Rows of one global block: the block is read once from the scratch files and written
# once to the new shards (32 MiB at 128 float16).
BLOCK_ROWS = 1 << 17
_FIELDS = ("num_shards", "total_rows", "dim", "dtype")


@dataclass(frozen=True)
class Resharded:
    """What a reshard wrote."""

    source: Path
    dest: Path
    source_shards: int
    shards: int
    rows: int
    dim: int
    dtype: str
    tag: str  # the snapshot every DEST shard holds, which its LATEST names
    seconds: float
    states: list[str]  # what each source shard was rebuilt from

    def describe(self) -> str:
        return (
            f"resharded {self.source} ({self.source_shards} shards) -> {self.dest} ({self.shards} shards): "
            f"{self.rows:,} rows x {self.dim} {self.dtype} in {self.seconds:.1f} s"
        )


def source_layout(source: str | os.PathLike, tag: str | None = None) -> tuple[int, int, int, str]:
    """(num_shards, total_rows, dim, dtype) of the bank in `source`, as shard 0's snapshot
    `tag` (default: what its LATEST names, or its log's header) records it, checked
    against every other shard. NotFound when `source` is no bank folder or a shard's
    folder or snapshot is missing; FailedPrecondition naming the files and fields when
    the shards disagree; DataLoss when a shard's files do not say."""
    source = Path(source)
    if not source.is_dir():
        raise NotFound(f"{source} is not a folder")
    found = sorted(p.name for p in source.glob("shard-*") if p.is_dir())
    if not found:
        raise NotFound(f"{source} holds no shard-*/ folder: not a bank's --snapshot-dir")
    first, first_path = _recorded_layout(source, 0, tag)
    expected = {snapshots.shard_dir(source, sid).name for sid in range(first["num_shards"])}
    missing = sorted(expected - set(found))
    if missing:
        raise NotFound(
            f"{source} lacks {', '.join(missing)}: {first_path} says the bank has {first['num_shards']} shards"
        )
    extra = sorted(set(found) - expected)
    if extra:
        raise FailedPrecondition(
            f"{source} holds {', '.join(extra)}, but {first_path} says the bank has {first['num_shards']} shards"
        )
    for sid in range(1, first["num_shards"]):
        recorded, path = _recorded_layout(source, sid, tag)
        diffs = [f"{k}: {recorded[k]!r} vs {first[k]!r}" for k in _FIELDS if recorded[k] != first[k]]
        if diffs:
            raise FailedPrecondition(f"{path} disagrees with {first_path} ({', '.join(diffs)})")
    return first["num_shards"], first["total_rows"], first["dim"], first["dtype"]


def _recorded_layout(source: Path, sid: int, tag: str | None) -> tuple[dict, Path]:
    """The layout fields shard `sid`'s files record, and the file that records them:
    snapshot `tag`, else the snapshot LATEST names, else the first log segment replayed."""
    folder = snapshots.shard_dir(source, sid)
    if tag is None:
        pointer = snapshots.read_latest(source, sid)
        tag = None if pointer is None else pointer["tag"]
    if tag is not None:
        path = snapshots.snapshot_path(source, sid, tag)
        if not path.exists():
            raise NotFound(f"snapshot {tag!r} of shard {sid} not found at {path}")
        recorded = snapshots.read_metadata(path).get("layout") or {}
    else:
        skip = update_log.torn_segments(folder, None if pointer is None else pointer["log"])
        numbers = [n for n in update_log.segment_numbers(folder) if n not in skip]
        segment = pointer["log"] if pointer is not None else (numbers[0] if numbers else None)
        if segment is None:
            raise DataLoss(f"{folder} holds no snapshot LATEST names and no update log: nothing says what it holds")
        path = update_log.segment_path(folder, segment)
        recorded = update_log.read_header(path)
    absent = [k for k in ("shard_id", *_FIELDS) if k not in recorded]
    if absent:
        raise DataLoss(f"{path} does not record the shard's {', '.join(absent)}")
    if recorded["shard_id"] != sid:
        raise FailedPrecondition(f"{path} is shard {recorded['shard_id']}'s, in the folder of shard {sid}")
    return recorded, path


def reshard(source: str | os.PathLike, dest: str | os.PathLike, shards: int, tag: str | None = None) -> Resharded:
    """Write the bank in `source` as a new bank of `shards` shards in `dest` (see the
    module's docstring). Refuses, changing nothing, with FailedPrecondition when `dest`
    exists, InvalidArgument when `shards` is not in [1, rows], and the errors of
    `source_layout`, recovery and the snapshot readers (naming the file) when a source
    shard cannot be read as it was written."""
    started = time.perf_counter()
    source, dest = Path(source), Path(dest)
    if dest.exists() or dest.is_symlink():
        raise FailedPrecondition(f"{dest} exists: reshard writes a new folder")
    if tag is not None:
        snapshots.check_tag(tag)
    num_source, rows, dim, dtype = source_layout(source, tag)
    if not 1 <= shards <= rows:
        raise InvalidArgument(f"--shards must be in [1, {rows:,}] (the bank's rows), got {shards}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.parent / f".{dest.name}.reshard-{os.getpid()}"
    partial.mkdir()
    scratches = []
    try:
        states = []
        for sid in range(num_source):
            layout = Layout(sid, num_source, rows, dim, dtype)
            scratches.append(_Scratch(partial / f"scratch-{sid:05d}.rows", layout))
            states.append(_rebuild(layout, source, tag, scratches[-1]))
        provenance = {"source": str(source.resolve()), "shards": num_source, "tag": tag, "states": states}
        _write(partial, scratches, shards, tag or DEFAULT_TAG, provenance)
        for scratch in scratches:
            scratch.remove()
        for sid in range(shards):
            snapshots.write_latest(partial, sid, tag or DEFAULT_TAG, None, 0)
        update_log.fsync_path(partial)
        if dest.exists():
            raise FailedPrecondition(f"{dest} appeared while resharding into it: left as it is")
        os.rename(partial, dest)
        update_log.fsync_path(dest.parent)
    except BaseException:
        for scratch in scratches:
            scratch.close()
        shutil.rmtree(partial, ignore_errors=True)
        raise
    seconds = time.perf_counter() - started
    return Resharded(source, dest, num_source, shards, rows, dim, dtype, tag or DEFAULT_TAG, seconds, states)


def _rebuild(layout: Layout, source: Path, tag: str | None, scratch: _Scratch) -> str:
    """Shard `layout.shard_id` of `source` into `scratch`, as recovery (no tag) or a
    Restore of `tag` would load it, changing nothing in `source`; says from what."""
    sid = layout.shard_id
    if tag is None:
        folder = snapshots.shard_dir(source, sid)
        pointer = snapshots.read_latest(source, sid)
        skip = update_log.torn_segments(folder, None if pointer is None else pointer["log"])
        walk = recovery.find_walk(layout, source, None, pointer, skip)
        if walk is None:  # source_layout refuses such a folder first
            raise DataLoss(f"{folder} holds neither LATEST nor an update log: nothing says what it holds")
    else:
        walk = recovery.Walk(tag=tag, seed=None, segment=None)
    if walk.tag is not None:
        path = snapshots.snapshot_path(source, sid, walk.tag)
        metadata, _ = snapshots.read_blocks(path, scratch.write, layout.rows_held, mapped=False)
        if Layout(**metadata["layout"]) != layout:
            raise FailedPrecondition(f"snapshot {path} has the layout {metadata['layout']}, not {asdict(layout)}")
        own = snapshots.own_segment(source, sid, path, metadata)
        if own is not None:
            update_log.check_layout(own, layout)
            update_log.read_records(own, layout.dim, scratch.dtype, scratch.apply, stop=metadata["log_end"])
        base = f"snapshot {walk.tag}"
    else:
        for begin, block in initial_blocks(layout, walk.seed):
            scratch.write(begin, block)
        base = f"initial rows (seed {walk.seed})"
    replayed = recovery.replay(layout, source, walk, scratch.apply)
    torn = f", a torn last record of {replayed.torn[0].name} passed over" if replayed.torn else ""
    return f"shard {sid}: {base} + {replayed.records} log record(s){torn}"


def _write(partial: Path, scratches: list[_Scratch], shards: int, tag: str, provenance: dict) -> None:
    """The new shards' snapshots, one record batch each per global block."""
    first = scratches[0].layout
    num_source, rows, dim, dtype = first.num_shards, first.total_rows, first.dim, first.dtype
    step = math.lcm(num_source, shards)
    block = max(step, BLOCK_ROWS // step * step)
    with ExitStack() as stack:
        writers = []
        for sid in range(shards):
            layout = Layout(sid, shards, rows, dim, dtype)
            metadata = snapshots.metadata(asdict(layout), tag, None, resharded_from=provenance)
            writers.append(stack.enter_context(snapshots.SnapshotWriter(partial, sid, tag, metadata, dim, dtype)))
        for g0 in range(0, rows, block):
            n = min(block, rows - g0)
            rows_block = np.empty((n, dim), DTYPES[dtype])
            for sid, scratch in enumerate(scratches):  # g0 is a multiple of S: local rows from g0 // S on
                rows_block[sid::num_source] = scratch.read(g0 // num_source, rows_on_shard(n, num_source, sid))
            for sid, writer in enumerate(writers):
                if sid < n:
                    writer.write(np.ascontiguousarray(rows_block[sid::shards]))
        for writer in writers:
            writer.commit()


class _Scratch:
    """One source shard's rows in a file of the partial DEST, written and read with
    pwrite and pread: the page cache holds them, not this process."""

    def __init__(self, path: Path, layout: Layout):
        self.path, self.layout = path, layout
        self.dtype = DTYPES[layout.dtype]
        self._row_bytes = layout.dim * self.dtype.itemsize
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.ftruncate(self._fd, layout.rows_held * self._row_bytes)

    def write(self, begin: int, rows: np.ndarray) -> None:
        data = np.ascontiguousarray(rows, self.dtype)
        if os.pwrite(self._fd, data, begin * self._row_bytes) != data.nbytes:
            raise OSError(f"short write to {self.path}")

    def apply(self, record: update_log.Record) -> None:
        """One log record's rows, each at its local row."""
        held = self.layout.rows_held
        if len(record.local) and not (0 <= record.local.min() and record.local.max() < held):
            raise update_log.LogCorrupt(
                f"update-log record (client {record.client_id!r}, sequence {record.sequence}) of shard "
                f"{self.layout.shard_id} writes local rows {int(record.local.min())}..{int(record.local.max())}, "
                f"outside [0, {held})"
            )
        for local, row in zip(record.local.tolist(), record.rows):
            self.write(local, row)

    def read(self, begin: int, count: int) -> np.ndarray:
        data = os.pread(self._fd, count * self._row_bytes, begin * self._row_bytes)
        if len(data) != count * self._row_bytes:
            raise OSError(f"short read from {self.path}")
        return np.frombuffer(data, self.dtype).reshape(count, self.layout.dim)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def remove(self) -> None:
        self.close()
        self.path.unlink()
