"""A shard's write-ahead update log: a redo log of results, one record per applied update.

A record holds what an update *produced*: the new rows in the storage dtype, with their
local row numbers (global index = local * num_shards + shard_id), the update's
``client_id`` and ``sequence``. Momentum updates do not commute and a retried input would
move a row twice; final values make replay exact and order-preserving: replaying a record
whose result a snapshot already holds writes the same bits again.

On disk, in the shard's snapshot folder: segments ``log-<number>.wal``. Each starts with
a header (magic, length, crc32, JSON: the segment's number, the segment it continues,
``previous``, the snapshot a new timeline starts from, ``base``, the ``seed`` of the
initial rows when a timeline starts from them, and the shard's layout: ``shard_id``,
``num_shards``, ``total_rows``, ``dim``, ``dtype``; recovery checks every segment it
replays against the shard's), then records::

    u32 payload length | u32 crc32(payload) | payload
    payload = u64 sequence | u32 rows | u16 len(client_id) | client_id | i64 local[rows] | rows values

A record is appended under the shard's lock, in applied order, before the shard changes
a row and before the caller replies, with one ``os.writev`` of the record's parts (no
per-row Python). ``fsync``:

- ``always``: the caller waits, after the shard's lock is released, until a
  ``fdatasync`` covers its record; one fsync covers every record written before it
  (group commit), so concurrent callers share it;
- ``everysec``: a background thread fsyncs once a second: a process crash loses nothing
  (the write reached the kernel before the reply), a machine crash up to a second;
- ``no``: the kernel decides when.

Segments form timelines: a snapshot rotates to a new segment whose ``previous`` is the
one it seals; a Restore starts a new generation (``previous`` null), so a crash after a
resume replays the resumed timeline. A segment's header is written to a temporary file,
fsynced and renamed into place, and the segment before it is fdatasynced first, so only
the newest segment can end in a torn record. A record cut short by a crash (a frame that
runs past the end of the file, or nothing but zeros from its start on) is dropped: its
update was never acknowledged. A bad record whose frame lies whole inside the file, or a
bad record anywhere but at the end, is corruption, and :class:`LogCorrupt` names the file
and offset.

After a failed fdatasync the log is broken (what the kernel kept of the failed pages is
unknown, and a retried fsync may report success falsely): the waiting callers get
DataLoss, and every later update is refused until the shard restarts and recovers.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import re
import struct
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bank_server.errors import DataLoss, InvalidArgument, Unavailable

log = logging.getLogger(__name__)

FSYNC_MODES = ("always", "everysec", "no")
MAGIC = b"IDWAL001"
_FRAME = struct.Struct("<II")  # payload length, crc32(payload)
_META = struct.Struct("<QIH")  # sequence, rows, len(client_id)
_HEADER_FRAME = struct.Struct("<8sII")  # magic, JSON length, crc32(JSON)
_MAX_CLIENT_ID = (1 << 16) - 1
_NAME = re.compile(r"log-(\d{8})\.wal")
EVERYSEC_S = 1.0


class LogCorrupt(DataLoss):
    """A log segment that cannot be read as written: the message names the file and what is wrong."""


def segment_path(folder: Path, number: int) -> Path:
    return Path(folder) / f"log-{number:08d}.wal"


def segment_numbers(folder: Path) -> list[int]:
    """The segments in `folder`, oldest first."""
    if not Path(folder).is_dir():
        return []
    return sorted(int(m.group(1)) for p in Path(folder).iterdir() if (m := _NAME.fullmatch(p.name)))


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's fsync makes a rename in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- reading -------------------------------------------------------------------------


def read_header(path: Path) -> dict:
    """A segment's header; LogCorrupt if it is not one."""
    with open(path, "rb") as fh:
        head = fh.read(_HEADER_FRAME.size)
        if len(head) < _HEADER_FRAME.size:
            raise LogCorrupt(f"log segment {path}: header cut short ({len(head)} bytes)")
        magic, length, crc = _HEADER_FRAME.unpack(head)
        if magic != MAGIC:
            raise LogCorrupt(f"log segment {path}: not an instdisc update log (magic {magic!r})")
        body = fh.read(length)
    if len(body) != length or zlib.crc32(body) != crc:
        raise LogCorrupt(f"log segment {path}: header checksum mismatch")
    return json.loads(body)


def fsync_file(path: Path, data_only: bool = True) -> None:
    """fdatasync (or fsync) the file at `path`."""
    fd = os.open(path, os.O_RDONLY)
    try:
        (os.fdatasync if data_only else os.fsync)(fd)
    finally:
        os.close(fd)


_LAYOUT_FIELDS = ("shard_id", "num_shards", "total_rows", "dim", "dtype")


def check_layout(path: Path, layout, header: dict | None = None) -> dict:
    """Segment `path`'s header, checked against the shard's `layout`; DataLoss naming
    the file and every field that differs (a log written with another --num-shards,
    --rows, --dim or --dtype would replay onto the wrong rows). A header from before
    ``total_rows`` was recorded is checked on the rest."""
    header = read_header(path) if header is None else header
    diffs = [
        f"{name}: log {header[name]!r} vs shard {getattr(layout, name)!r}"
        for name in _LAYOUT_FIELDS
        if name in header and header[name] != getattr(layout, name)
    ]
    if diffs:
        raise DataLoss(
            f"log segment {path} was written for another layout ({', '.join(diffs)}); it cannot be "
            "replayed onto this shard: start it with the layout the log was written with"
        )
    return header


def torn_segment(path: Path) -> str | None:
    """Why segment `path` is a segment whose creation a crash cut short (empty, or its
    header cut short: no record can follow), or None if it is not one."""
    data = path.read_bytes()
    if not data:
        return "empty"
    if len(data) < _HEADER_FRAME.size:
        if MAGIC.startswith(data[: len(MAGIC)]) or not data.strip(b"\0"):
            return f"header cut short ({len(data)} bytes)"
        return None
    magic, length, _ = _HEADER_FRAME.unpack_from(data)
    if not data.strip(b"\0"):
        return f"all zeros ({len(data)} bytes)"
    if magic == MAGIC and len(data) < _HEADER_FRAME.size + length:
        return f"header cut short ({len(data)} of {_HEADER_FRAME.size + length} bytes)"
    return None


def torn_segments(folder: Path, named: int | None = None) -> dict[int, str]:
    """Segment number -> why, for the segments whose creation a crash cut short (see
    `torn_segment`) that no other segment continues and that `named` (LATEST's) is not:
    they hold no record, and a reader passes over them. Changes nothing."""
    numbers = segment_numbers(folder)
    torn = {n: why for n in numbers if (why := torn_segment(segment_path(folder, n)))}
    if not torn:
        return {}
    continued = set()
    for number in numbers:
        if number not in torn:
            previous = read_header(segment_path(folder, number)).get("previous")
            continued.add(previous)
    # The others are read as they are: LogCorrupt names them.
    return {n: why for n, why in sorted(torn.items()) if n not in continued and n != named}


def remove_torn_segments(folder: Path, named: int | None = None) -> list[str]:
    """Remove the segments `torn_segments` finds. Returns a line for each removed."""
    removed = []
    for number, why in torn_segments(folder, named).items():
        path = segment_path(folder, number)
        path.unlink()
        removed.append(f"removed {path} ({why}, no record): a crash cut its creation short")
    if removed:
        fsync_path(folder)
    return removed


def _header_size(path: Path) -> int:
    with open(path, "rb") as fh:
        _, length, _ = _HEADER_FRAME.unpack(fh.read(_HEADER_FRAME.size))
    return _HEADER_FRAME.size + length


@dataclass
class Record:
    local: np.ndarray  # int64 local row numbers
    rows: np.ndarray  # (n, dim) new values, storage dtype
    client_id: str
    sequence: int


@dataclass
class Scan:
    """What reading a segment found: the records used, where good data ends, and the
    bytes of a torn last record (0 if none)."""

    records: int
    good_end: int
    torn_bytes: int


def read_records(
    path: Path,
    dim: int,
    dtype: np.dtype,
    apply: Callable[[Record], None],
    *,
    start: int = 0,
    stop: int | None = None,
    allow_torn_tail: bool = True,
) -> Scan:
    """Call `apply` on records [start, stop) of segment `path`, in order. A bad last record
    cut short by the end of the file (its frame, or the payload its length announces, runs
    past it), or nothing but zeros from the record's start on, is a torn tail (a crash
    mid-write): dropped when `allow_torn_tail`, else LogCorrupt. Any other bad record,
    among them a last one whose frame lies whole in the file but fails its checksum, is
    LogCorrupt naming the file and offset. LogCorrupt too when the segment holds fewer
    than `stop` records."""
    dtype = np.dtype(dtype)
    row_bytes = dim * dtype.itemsize
    size = path.stat().st_size
    offset = _header_size(path)
    count = 0
    torn = 0
    with open(path, "rb") as fh:
        mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        view = memoryview(mapped) if size else memoryview(b"")
        try:
            while offset < size and (stop is None or count < stop):
                problem = _check_record(view, offset, size, row_bytes)
                if problem is not None:
                    cut_short = (
                        offset + _FRAME.size > size or offset + _FRAME.size + _FRAME.unpack_from(view, offset)[0] > size
                    )
                    zeros = not bytes(view[offset:size]).strip(b"\0")
                    torn = cut_short or zeros
                    if not (allow_torn_tail and torn):
                        why = (
                            "a torn record is only allowed at the end of the newest segment"
                            if torn
                            else "its frame lies whole inside the file: corruption, not a torn write"
                        )
                        raise LogCorrupt(f"log segment {path}: bad record #{count} at byte {offset} ({problem}); {why}")
                    torn = size - offset
                    break
                length = _FRAME.unpack_from(view, offset)[0]
                if count >= start:
                    apply(_decode(view[offset + _FRAME.size : offset + _FRAME.size + length], dim, dtype))
                offset += _FRAME.size + length
                count += 1
        finally:
            view.release()
            if mapped is not None:
                try:
                    mapped.close()
                except BufferError:  # `apply` raised and its traceback still holds a record's arrays:
                    pass  # the map closes with them, and the error it raised is the one to see
    if stop is not None and count < stop:
        raise LogCorrupt(f"log segment {path}: holds {count} good records, a snapshot needs its first {stop}")
    return Scan(count, offset, torn)


def _check_record(view, offset: int, size: int, row_bytes: int) -> str | None:
    if offset + _FRAME.size > size:
        return "frame cut short"
    length, crc = _FRAME.unpack_from(view, offset)
    if length < _META.size:
        return f"length {length} too small"
    if offset + _FRAME.size + length > size:
        return f"length {length} runs past the end of the file"
    payload = view[offset + _FRAME.size : offset + _FRAME.size + length]
    if zlib.crc32(payload) != crc:
        return "checksum mismatch"
    _, n, cid = _META.unpack_from(payload)
    if _META.size + cid + n * (8 + row_bytes) != length:
        return f"length {length} does not fit {n} rows of {row_bytes} bytes"
    return None


def _decode(payload, dim: int, dtype: np.dtype) -> Record:
    sequence, n, cid = _META.unpack_from(payload)
    at = _META.size
    client_id = bytes(payload[at : at + cid]).decode()
    at += cid
    local = np.frombuffer(payload, dtype="<i8", count=n, offset=at)
    rows = np.frombuffer(payload, dtype=dtype, count=n * dim, offset=at + 8 * n).reshape(n, dim)
    return Record(local, rows, client_id, sequence)


def successors(folder: Path, skip=()) -> dict[int, int]:
    """Segment number -> the segment that continues it (absent: the end of its timeline),
    over the segments not in `skip`. LogCorrupt if a header cannot be read."""
    following = {}
    for number in segment_numbers(folder):
        if number in skip:
            continue
        previous = read_header(segment_path(folder, number)).get("previous")
        if previous is not None:
            following[previous] = number
    return following


def chain(start: int, following: dict[int, int]) -> list[int]:
    """`start` and the segments that continue it, in order."""
    out = [start]
    while out[-1] in following:
        out.append(following[out[-1]])
    return out


def prune_segments(folder: Path, starts: list[int], active: int | None) -> list[Path]:
    """Delete the segments no timeline from `starts` (the kept snapshots' and LATEST's
    segments) reaches, never the `active` one; returns what was deleted."""
    following = successors(folder)
    needed = {active}
    for start in starts:
        needed.update(chain(start, following))
    doomed = [segment_path(folder, n) for n in segment_numbers(folder) if n not in needed]
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


# -- writing -------------------------------------------------------------------------


class UpdateLog:
    """The active segment of one shard's log, appended by the shard under its lock.

    ``append`` returns a ticket; ``wait_durable(ticket)`` returns once the record is as
    durable as the fsync mode promises (with ``always``: fsynced).
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        layout,
        fsync: str = "everysec",
        *,
        previous: int | None = None,
        base: str | None = None,
        seed: int | None = None,
    ):
        if fsync not in FSYNC_MODES:
            raise InvalidArgument(f"fsync must be one of {FSYNC_MODES}, got {fsync!r}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self._layout = layout
        self._row_bytes = layout.dim * np.dtype(layout.dtype).itemsize
        self._sync_lock = threading.Lock()  # taken inside the shard's lock, never around it
        self._written = 0  # records appended since the log opened (tickets)
        self._synced = 0  # of those, the ones an fsync covers
        self.bytes_written = 0
        self.fsyncs = 0  # fdatasyncs of the active segment: with `always`, fewer than the calls (group commit)
        self.last_sync = time.monotonic()
        self._broken: str | None = None
        # A timeline's first segment says what it follows (`base`, or the rows of `seed`),
        # so a folder that lost its LATEST can still tell whether its log is whole.
        self.segment, self._fd = self._open_segment(previous, base, None if previous is not None or base else seed)
        self.records = 0  # records in the active segment
        self._offset = os.lseek(self._fd, 0, os.SEEK_END)
        self._stop = threading.Event()
        self._thread = None
        if fsync == "everysec":
            self._thread = threading.Thread(target=self._sync_every_second, name="update-log-fsync", daemon=True)
            self._thread.start()

    def _open_segment(self, previous: int | None, base: str | None = None, seed: int | None = None) -> tuple[int, int]:
        """A new segment after every existing one. Its header is written to a temporary
        file, fsynced and renamed into place (the folder fsynced too), so a crash leaves
        no segment or a whole header, never a header cut short."""
        numbers = segment_numbers(self.folder)
        number = (numbers[-1] + 1) if numbers else 1
        header = json.dumps(
            {
                "segment": number,
                "previous": previous,
                "base": base,
                "seed": seed,
                "created": time.time(),
                **{name: getattr(self._layout, name) for name in _LAYOUT_FIELDS},
            }
        ).encode()
        path = segment_path(self.folder, number)
        if path.exists():
            raise FileExistsError(f"log segment {path} exists already")
        tmp = self.folder / f".{path.name}.tmp-{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            data = _HEADER_FRAME.pack(MAGIC, len(header), zlib.crc32(header)) + header
            if os.write(fd, data) != len(data):
                raise OSError(f"short write of the header of {path}")
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_path(self.folder)
        return number, os.open(path, os.O_WRONLY | os.O_APPEND)

    @property
    def written(self) -> int:
        """The ticket of the last record appended."""
        return self._written

    @property
    def path(self) -> Path:
        return segment_path(self.folder, self.segment)

    def append(self, local: np.ndarray, rows: np.ndarray, client_id: str, sequence: int) -> int:
        """Write one record (call under the shard's lock, before changing the rows);
        returns its ticket. On a failed write nothing is left half-written and
        Unavailable says why; the caller must then not apply the update."""
        if self._broken:
            raise Unavailable(f"the update log {self.path} cannot be written ({self._broken}); updates are refused")
        cid = client_id.encode()
        if len(cid) > _MAX_CLIENT_ID:
            raise InvalidArgument(f"update.client_id is {len(cid)} bytes, over {_MAX_CLIENT_ID}")
        local = np.ascontiguousarray(local, dtype="<i8")
        rows = np.ascontiguousarray(rows)
        meta = _META.pack(sequence & 0xFFFFFFFFFFFFFFFF, len(local), len(cid)) + cid
        length = len(meta) + local.nbytes + rows.nbytes
        crc = zlib.crc32(rows, zlib.crc32(local, zlib.crc32(meta)))
        parts = [_FRAME.pack(length, crc) + meta, local, rows]
        total = _FRAME.size + length
        try:
            written = os.writev(self._fd, parts)
            if written != total:
                raise OSError(f"short write: {written} of {total} bytes")
        except OSError as error:
            self._undo(error)
            raise Unavailable(
                f"cannot write the update log {self.path}: {error}; the update was not applied"
            ) from error
        self._offset += total
        self.bytes_written += total
        self.records += 1
        self._written += 1
        return self._written

    def _undo(self, error: OSError) -> None:
        """Cut a failed record off the segment, so the log stays readable; if even that
        fails, refuse every later update rather than log after garbage."""
        try:
            os.ftruncate(self._fd, self._offset)
        except OSError as again:
            self._broken = f"{error}; truncating after it failed too: {again}"
            log.error("update log %s is broken: %s", self.path, self._broken)

    def wait_durable(self, ticket: int) -> None:
        """With fsync=always, return once an fsync covers record `ticket` (call outside
        the shard's lock: others keep appending meanwhile, and one fsync covers them).
        DataLoss if the fsync failed, now or before: the record may not be on disk."""
        if self.fsync == "always" and self._synced < ticket:
            self.sync(ticket)

    def sync(self, ticket: int | None = None) -> None:
        """fdatasync the active segment up to `ticket` (default: everything written).
        DataLoss if the log is broken or the fdatasync fails (it is broken from then on)."""
        with self._sync_lock:
            target = self._written if ticket is None else max(ticket, 0)
            if self._synced >= target:
                return
            if self._broken:
                raise DataLoss(
                    f"the update log {self.path} is broken ({self._broken}): records written since "
                    "its last good fsync may not be on disk; restart the shard to recover from the log"
                )
            covered = self._written  # read before the fsync: every record up to it is in the kernel
            self._fdatasync(self._fd)
            self.fsyncs += 1
            self._synced = covered
            self.last_sync = time.monotonic()

    def _fdatasync(self, fd: int) -> None:
        """fdatasync `fd` (under the sync lock); a failure breaks the log for good and
        raises DataLoss."""
        try:
            os.fdatasync(fd)
        except OSError as error:
            self._broken = f"fdatasync failed: {error}"
            log.error("update log %s is broken: %s; updates are refused", self.path, self._broken)
            raise DataLoss(
                f"fdatasync of the update log {self.path} failed ({error}): records written since its "
                "last good fsync may not be on disk; updates are refused; restart the shard to recover "
                "from the log"
            ) from error

    def fsync_lag(self) -> float:
        """Seconds since the last fsync if written records wait for one, else 0."""
        return time.monotonic() - self.last_sync if self._synced < self._written else 0.0

    def rotate(self, *, new_generation: bool = False, base: str | None = None) -> int:
        """Start a new segment (call under the shard's lock): continuing this one, or,
        with `new_generation`, a timeline of its own (after a Restore). The old segment is
        fdatasynced and closed before the new one exists, so a torn record can only ever
        be in the newest segment. Returns the new segment's number."""
        with self._sync_lock:
            if self._broken:
                raise DataLoss(f"the update log {self.path} is broken ({self._broken}); restart the shard")
            covered = self._written
            self._fdatasync(self._fd)
            self._synced = covered
            previous = None if new_generation else self.segment
            number, fd = self._open_segment(previous, base)
            os.close(self._fd)
            self.segment, self._fd = number, fd
            self.records = 0
            self._offset = os.lseek(fd, 0, os.SEEK_END)
        return number

    def seal(self) -> None:
        """Kept for callers: `rotate` now fsyncs the segment it seals itself."""

    def _sync_every_second(self) -> None:
        while not self._stop.wait(EVERYSEC_S):
            try:
                self.sync()
            except DataLoss:  # the log is broken (logged): updates are refused from now on
                return

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            if self.fsync != "no":
                self.sync()
        except DataLoss as error:  # broken: said when it broke; recovery reads what reached the disk
            log.error("closing the update log %s without a last fsync: %s", self.path, error)
        finally:
            with self._sync_lock:
                if self._fd >= 0:
                    os.close(self._fd)
                self._fd = -1
