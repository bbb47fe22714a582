"""A shard's write-ahead update log: a redo log of results, one record per applied update.

A record holds what an update *produced*: the new rows in the storage dtype, with their
local row numbers (global index = local * num_shards + shard_id), the update's
``client_id`` and ``sequence``. Momentum updates do not commute and a retried input would
move a row twice; final values make replay exact and order-preserving: replaying a record
whose result a snapshot already holds writes the same bits again.

On disk, in the shard's snapshot folder: segments ``log-<number>.wal``. Each starts with
a header (magic, length, crc32, JSON: the segment's number, the segment it continues,
``previous``, the snapshot a new timeline starts from, ``base``, the ``seed`` of the
initial rows when a timeline starts from them, and the shard's layout), then records::

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
resume replays the resumed timeline. A record cut short by a crash (only ever the last
one of the newest segment: sealed segments are fsynced) is detected by its length or
checksum and dropped: its update was never acknowledged. A bad record anywhere else is
corruption, and :class:`LogCorrupt` names the file and offset.
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bank_server.errors import DataLoss, InvalidArgument, Unavailable

log = logging.getLogger(__name__)

FSYNC_MODES = ("always", "everysec", "no")
MAGIC = b"IDWAL001"
_FRAME = struct.Struct("<II")          # payload length, crc32(payload)
_META = struct.Struct("<QIH")          # sequence, rows, len(client_id)
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


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
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


def _header_size(path: Path) -> int:
    with open(path, "rb") as fh:
        _, length, _ = _HEADER_FRAME.unpack(fh.read(_HEADER_FRAME.size))
    return _HEADER_FRAME.size + length


@dataclass
class Record:
    local: np.ndarray      # int64 local row numbers
    rows: np.ndarray       # (n, dim) new values, storage dtype
    client_id: str
    sequence: int


@dataclass
class Scan:
    """What reading a segment found: the records used, where good data ends, and the
    bytes of a torn last record (0 if none)."""
    records: int
    good_end: int
    torn_bytes: int


def read_records(path: Path, dim: int, dtype: np.dtype, apply: Callable[[Record], None], *,
                 start: int = 0, stop: int | None = None, allow_torn_tail: bool = True) -> Scan:
    """Call `apply` on records [start, stop) of segment `path`, in order. A bad last record
    (cut short, or with zeros after it: a crash mid-write) is a torn tail: dropped when
    `allow_torn_tail`, else LogCorrupt; any other bad record is LogCorrupt. LogCorrupt too
    when the segment holds fewer than `stop` records."""
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
                    length = _FRAME.unpack_from(view, offset)[0] if offset + _FRAME.size <= size else 0
                    end = offset + _FRAME.size + length
                    tail_is_zero = end >= size or not bytes(view[end:size]).strip(b"\0")
                    if not (allow_torn_tail and tail_is_zero):
                        raise LogCorrupt(f"log segment {path}: bad record #{count} at byte {offset} ({problem})"
                                         + ("" if tail_is_zero else " with more data after it"))
                    torn = size - offset
                    break
                length = _FRAME.unpack_from(view, offset)[0]
                if count >= start:
                    apply(_decode(view[offset + _FRAME.size:offset + _FRAME.size + length], dim, dtype))
                offset += _FRAME.size + length
                count += 1
        finally:
            view.release()
            if mapped is not None:
                mapped.close()
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
    payload = view[offset + _FRAME.size:offset + _FRAME.size + length]
    if zlib.crc32(payload) != crc:
        return "checksum mismatch"
    _, n, cid = _META.unpack_from(payload)
    if _META.size + cid + n * (8 + row_bytes) != length:
        return f"length {length} does not fit {n} rows of {row_bytes} bytes"
    return None


def _decode(payload, dim: int, dtype: np.dtype) -> Record:
    sequence, n, cid = _META.unpack_from(payload)
    at = _META.size
    client_id = bytes(payload[at:at + cid]).decode()
    at += cid
    local = np.frombuffer(payload, dtype="<i8", count=n, offset=at)
    rows = np.frombuffer(payload, dtype=dtype, count=n * dim, offset=at + 8 * n).reshape(n, dim)
    return Record(local, rows, client_id, sequence)


def successors(folder: Path) -> dict[int, int]:
    """Segment number -> the segment that continues it (absent: the end of its timeline).
    LogCorrupt if a header cannot be read."""
    following = {}
    for number in segment_numbers(folder):
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

    def __init__(self, folder: str | os.PathLike, layout, fsync: str = "everysec", *, previous: int | None = None,
                 base: str | None = None, seed: int | None = None):
        if fsync not in FSYNC_MODES:
            raise InvalidArgument(f"fsync must be one of {FSYNC_MODES}, got {fsync!r}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self._layout = layout
        self._row_bytes = layout.dim * np.dtype(layout.dtype).itemsize
        self._sync_lock = threading.Lock()   # taken inside the shard's lock, never around it
        self._written = 0       # records appended since the log opened (tickets)
        self._synced = 0        # of those, the ones an fsync covers
        self._sealed: list[int] = []  # fds of rotated segments not yet fsynced
        self.bytes_written = 0
        self.fsyncs = 0         # fdatasyncs of the active segment: with `always`, fewer than the calls (group commit)
        self.last_sync = time.monotonic()
        self._broken: str | None = None
        # A timeline's first segment says what it follows (`base`, or the rows of `seed`),
        # so a folder that lost its LATEST can still tell whether its log is whole.
        self.segment, self._fd = self._open_segment(previous, base, None if previous is not None or base else seed)
        self.records = 0        # records in the active segment
        self._offset = os.lseek(self._fd, 0, os.SEEK_END)
        self._stop = threading.Event()
        self._thread = None
        if fsync == "everysec":
            self._thread = threading.Thread(target=self._sync_every_second, name="update-log-fsync", daemon=True)
            self._thread.start()

    def _open_segment(self, previous: int | None, base: str | None = None,
                      seed: int | None = None) -> tuple[int, int]:
        """A new segment after every existing one, its header fsynced with the folder."""
        numbers = segment_numbers(self.folder)
        number = (numbers[-1] + 1) if numbers else 1
        header = json.dumps({"segment": number, "previous": previous, "base": base, "seed": seed,
                             "created": time.time(),
                             "shard_id": self._layout.shard_id, "num_shards": self._layout.num_shards,
                             "dim": self._layout.dim, "dtype": self._layout.dtype}).encode()
        path = segment_path(self.folder, number)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        os.write(fd, _HEADER_FRAME.pack(MAGIC, len(header), zlib.crc32(header)) + header)
        os.fsync(fd)
        _fsync_dir(self.folder)
        return number, fd

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
            raise Unavailable(f"cannot write the update log {self.path}: {error}; the update was not applied") from error
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
        the shard's lock: others keep appending meanwhile, and one fsync covers them)."""
        if self.fsync == "always" and self._synced < ticket:
            self.sync(ticket)

    def sync(self, ticket: int | None = None) -> None:
        """fdatasync the sealed segments and the active one up to `ticket` (default:
        everything written)."""
        with self._sync_lock:
            target = self._written if ticket is None else max(ticket, 0)
            if self._synced >= target and not self._sealed:
                return
            covered = self._written  # read before the fsync: every record up to it is in the kernel
            for fd in self._sealed:
                os.fdatasync(fd)
                os.close(fd)
            self._sealed.clear()
            os.fdatasync(self._fd)
            self.fsyncs += 1
            self._synced = covered
            self.last_sync = time.monotonic()

    def fsync_lag(self) -> float:
        """Seconds since the last fsync if written records wait for one, else 0."""
        return time.monotonic() - self.last_sync if self._synced < self._written else 0.0

    def rotate(self, *, new_generation: bool = False, base: str | None = None) -> int:
        """Start a new segment (call under the shard's lock): continuing this one, or,
        with `new_generation`, a timeline of its own (after a Restore). The old segment is
        fsynced by the next ``sync`` (``seal`` outside the lock). Returns its number."""
        with self._sync_lock:
            previous = None if new_generation else self.segment
            number, fd = self._open_segment(previous, base)
            self._sealed.append(self._fd)
            self.segment, self._fd = number, fd
            self.records = 0
            self._offset = os.lseek(fd, 0, os.SEEK_END)
        return number

    def seal(self) -> None:
        """fsync rotated segments (outside the shard's lock): a sealed segment is whole on disk."""
        self.sync()

    def _sync_every_second(self) -> None:
        while not self._stop.wait(EVERYSEC_S):
            try:
                self.sync()
            except OSError as error:  # reported, and tried again next second
                log.error("fsync of the update log %s failed: %s", self.path, error)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.fsync != "no":
            self.sync()
        with self._sync_lock:
            for fd in [*self._sealed, self._fd]:
                os.close(fd)
            self._sealed.clear()
            self._fd = -1


def iter_segments(folder: Path) -> Iterator[tuple[int, dict]]:
    for number in segment_numbers(folder):
        yield number, read_header(segment_path(folder, number))
