"""Shard snapshots as uncompressed Arrow IPC files (memory-mappable), each record batch
carrying the crc32 of its rows.

Layout on disk: ``<dir>/shard-<id>/<tag>.arrow``, the update log's segments
(:mod:`bank_server.update_log`) beside them, and a ``LATEST`` file saying where
recovery starts: a JSON object ``{"tag": ..., "log": segment, "from": record}`` (the
snapshot, then the log from record `from` of segment `log` on; ``tag`` null means the
seeded initial rows). An older ``LATEST`` holding just a tag still reads. Snapshot
files and ``LATEST`` are written to a temporary file, fsynced and renamed, so a crash
leaves either the old one or the new one, never half of one.

A snapshot's rows are copied block by block while updates go on (see
``Shard.snapshot``): each batch's metadata says how many records of the snapshot's log
segment (``log_segment`` in the schema's metadata) had been written when it was copied;
the last batch's count, ``log_end``, is the snapshot's consistency point. The file plus
records ``[0, log_end)`` of that segment is exactly the shard at that point.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa

from bank_server import update_log
from bank_server.errors import DataLoss, InvalidArgument, NotFound

log = logging.getLogger(__name__)

TAG_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,128}")
METADATA_KEY = b"instdisc.bank"
CRC_KEY, LOG_END_KEY = b"crc32", b"log_end"
PERIODIC_PREFIX = "periodic-"


class SnapshotCorrupt(DataLoss):
    """A snapshot file that is truncated or whose rows fail their checksum."""


def check_tag(tag: str) -> str:
    if not TAG_PATTERN.fullmatch(tag or "") or tag in (".", ".."):
        raise InvalidArgument(f"tag must match {TAG_PATTERN.pattern}, got {tag!r}")
    return tag


def shard_dir(directory: str | os.PathLike, shard_id: int) -> Path:
    return Path(directory) / f"shard-{shard_id:05d}"


def snapshot_path(directory: str | os.PathLike, shard_id: int, tag: str) -> Path:
    return shard_dir(directory, shard_id) / f"{check_tag(tag)}.arrow"


def _replace_durably(tmp: Path, final: Path) -> None:
    update_log.fsync_path(tmp)
    os.replace(tmp, final)
    update_log.fsync_path(final.parent)


def metadata(
    layout: dict,
    tag: str,
    log_segment: int | None,
    updates_applied: int = 0,
    rows_updated: int = 0,
    seen=(),
    **more,
) -> dict:
    """What a snapshot's schema carries besides its rows: the shard's layout (``asdict``
    of `bank_server.shard.Layout`), the tag, the update counters, the ``(client_id,
    sequence)`` pairs remembered for idempotent retries, the log segment its rows continue
    into, when it was made, and `more` (a reshard's provenance)."""
    return {
        "layout": layout,
        "tag": tag,
        "updates_applied": updates_applied,
        "rows_updated": rows_updated,
        "seen": [[c, s] for c, s in seen],
        "log_segment": log_segment,
        "created": time.time(),
        **more,
    }


class SnapshotWriter:
    """Snapshot `tag` of shard `shard_id`, written a record batch at a time to a temporary
    file: ``commit()`` renames it into place durably; leaving the ``with`` block without
    a commit removes it. Several can be open at once (a reshard writes every new shard
    in step). LATEST is not touched."""

    def __init__(self, directory: str | os.PathLike, shard_id: int, tag: str, metadata: dict, dim: int, dtype):
        check_tag(tag)
        folder = shard_dir(directory, shard_id)
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{tag}.arrow"
        self.log_end = 0
        self._tmp = folder / f".{tag}.arrow.tmp-{os.getpid()}"
        self._dim = dim
        self._type = pa.from_numpy_dtype(np.dtype(dtype))
        self._schema = pa.schema(
            [pa.field("row", pa.list_(self._type, dim))], metadata={METADATA_KEY: json.dumps(metadata).encode()}
        )
        self._sink = pa.OSFile(str(self._tmp), "wb")
        try:
            self._writer = pa.ipc.new_file(self._sink, self._schema)
        except BaseException:
            self._sink.close()
            self._tmp.unlink(missing_ok=True)
            raise

    def write(self, chunk: np.ndarray, log_end: int = 0) -> None:
        """Append rows `chunk` (C-contiguous), copied when the log's segment held `log_end` records."""
        values = pa.array(chunk.reshape(-1), type=self._type)
        column = pa.FixedSizeListArray.from_arrays(values, self._dim)
        self._writer.write_batch(
            pa.record_batch([column], schema=self._schema),
            custom_metadata={CRC_KEY: str(zlib.crc32(chunk)), LOG_END_KEY: str(log_end)},
        )
        self.log_end = log_end

    def commit(self) -> Path:
        self._close()
        _replace_durably(self._tmp, self.path)
        return self.path

    def _close(self) -> None:
        if not self._sink.closed:
            try:
                self._writer.close()
            finally:
                self._sink.close()

    def __enter__(self) -> SnapshotWriter:
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._close()
        finally:
            self._tmp.unlink(missing_ok=True)


def write(
    directory: str | os.PathLike,
    shard_id: int,
    tag: str,
    metadata: dict,
    dim: int,
    dtype,
    blocks: Iterable[tuple[np.ndarray, int]],
) -> tuple[Path, int, float, int]:
    """Write the row blocks `blocks` yields, each with the log position at its copy, as
    snapshot `tag`; return (path, bytes, seconds, log_end). LATEST is not touched."""
    start = time.perf_counter()
    with SnapshotWriter(directory, shard_id, tag, metadata, dim, dtype) as writer:
        for chunk, log_end in blocks:
            writer.write(chunk, log_end)
        final = writer.commit()
    return final, final.stat().st_size, time.perf_counter() - start, writer.log_end


# -- LATEST --------------------------------------------------------------------------


def latest_path(directory: str | os.PathLike, shard_id: int) -> Path:
    return shard_dir(directory, shard_id) / "LATEST"


def write_latest(
    directory: str | os.PathLike,
    shard_id: int,
    tag: str | None,
    segment: int | None,
    start: int = 0,
    seed: int | None = None,
) -> None:
    """Point recovery at snapshot `tag` (None: the initial rows of `seed`) followed by
    the log from record `start` of `segment` on."""
    folder = shard_dir(directory, shard_id)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".LATEST.tmp-{os.getpid()}"
    tmp.write_text(json.dumps({"tag": tag, "log": segment, "from": start, "seed": seed}))
    _replace_durably(tmp, folder / "LATEST")


def read_latest(directory: str | os.PathLike, shard_id: int) -> dict | None:
    """LATEST as {"tag", "log", "from", "seed"}; None if there is none; DataLoss naming
    the file if it cannot be read."""
    path = latest_path(directory, shard_id)
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as error:
        raise DataLoss(f"{path} cannot be read: {error}") from error
    if not text.startswith("{"):  # written before the update log: just a tag
        try:
            return {"tag": check_tag(text), "log": None, "from": 0, "seed": None}
        except InvalidArgument:
            raise DataLoss(f"{path} is unreadable: {text[:80]!r} is neither a tag nor JSON") from None
    try:
        pointer = json.loads(text)
        tag, segment, start = pointer["tag"], pointer["log"], int(pointer["from"])
        if tag is not None:
            check_tag(tag)
        if segment is not None and (not isinstance(segment, int) or segment < 1):
            raise ValueError(f"log {segment!r}")
        if tag is None and pointer.get("seed") is None:
            raise ValueError("neither a tag nor a seed")
    except (ValueError, KeyError, TypeError, InvalidArgument) as error:
        raise DataLoss(f"{path} is unreadable: {error} in {text[:120]!r}") from None
    return {"tag": tag, "log": segment, "from": start, "seed": pointer.get("seed")}


def latest_tag(directory: str | os.PathLike, shard_id: int) -> str | None:
    pointer = read_latest(directory, shard_id)
    return None if pointer is None else pointer["tag"]


# -- reading -------------------------------------------------------------------------


def _open(path: Path, mapped: bool = True):
    try:
        return pa.ipc.open_file(pa.memory_map(str(path)) if mapped else pa.OSFile(str(path)))
    except FileNotFoundError:
        raise NotFound(f"snapshot {path} not found") from None
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as error:
        raise SnapshotCorrupt(f"snapshot {path} is truncated or not an Arrow file: {error}") from None


def read_metadata(path: Path) -> dict:
    try:
        return json.loads(_open(path).schema.metadata[METADATA_KEY])
    except (KeyError, TypeError, ValueError) as error:
        raise SnapshotCorrupt(f"snapshot {path} has no readable metadata: {error}") from None


def read_into(path: Path, target: np.ndarray | None, expect_rows: int | None = None) -> tuple[dict, int]:
    """Check every batch's crc32 and, when `target` is given, copy the rows into it
    (no other copy of the rows is made). Returns (metadata with ``log_end`` added,
    rows). SnapshotCorrupt, naming the file and batch, on any mismatch."""

    def copy(offset: int, rows: np.ndarray) -> None:
        if offset + len(rows) > len(target):
            raise SnapshotCorrupt(f"snapshot {path} holds more than {len(target)} rows")
        target[offset : offset + len(rows)] = rows

    return read_blocks(path, None if target is None else copy, expect_rows)


def read_blocks(
    path: Path, put: Callable[[int, np.ndarray], None] | None, expect_rows: int | None = None, *, mapped: bool = True
) -> tuple[dict, int]:
    """`read_into` with `put(first row, rows)` called on each batch once checked. With
    `mapped` false the file is read a batch at a time instead of memory-mapped, so the
    process never maps more than a batch of it."""
    reader = _open(path, mapped)
    try:
        metadata = json.loads(reader.schema.metadata[METADATA_KEY])
        dim = reader.schema.field("row").type.list_size
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise SnapshotCorrupt(f"snapshot {path} has no readable metadata: {error}") from None
    offset, log_end, unchecked = 0, 0, 0
    for i in range(reader.num_record_batches):
        try:
            batch, custom = reader.get_batch_with_custom_metadata(i)
            values = batch.column(0).flatten().to_numpy(zero_copy_only=False)
        except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as error:
            raise SnapshotCorrupt(f"snapshot {path}: batch {i} cannot be read: {error}") from None
        n = len(values) // dim
        if custom is not None and CRC_KEY in custom:
            if zlib.crc32(values) != int(custom[CRC_KEY]):
                raise SnapshotCorrupt(
                    f"snapshot {path}: rows {offset}..{offset + n - 1} (batch {i}) fail their crc32 checksum"
                )
            log_end = int(custom[LOG_END_KEY])
        else:
            unchecked += 1
        if expect_rows is not None and offset + n > expect_rows:
            raise SnapshotCorrupt(f"snapshot {path} holds more than {expect_rows} rows")
        if put is not None:
            put(offset, values.reshape(n, dim))
        offset += n
    if unchecked:
        log.warning(
            "snapshot %s: %d batch(es) carry no checksum (written before checksums); read unchecked", path, unchecked
        )
    if expect_rows is not None and offset != expect_rows:
        raise SnapshotCorrupt(f"snapshot {path} holds {offset} rows, the shard {expect_rows}")
    metadata["log_end"] = log_end
    return metadata, offset


def own_segment(directory: str | os.PathLike, shard_id: int, path: Path, metadata: dict) -> Path | None:
    """The update-log segment whose first ``log_end`` records complete snapshot `path`
    (`metadata` as `read_blocks` returns it); None when it needs none. DataLoss when it
    is missing."""
    segment, end = metadata.get("log_segment"), metadata["log_end"]
    if not (segment and end):
        return None
    found = update_log.segment_path(shard_dir(directory, shard_id), segment)
    if not found.exists():
        raise DataLoss(f"snapshot {path} needs its update-log segment {found}, which is missing")
    return found


def read(directory: str | os.PathLike, shard_id: int, tag: str | None = None) -> tuple[np.ndarray, dict, Path]:
    """Rows, metadata and path of snapshot `tag` (default: the one LATEST names), checked:
    the shard as it was when the snapshot ended (the file plus its log segment's first
    ``log_end`` records).

    Raises NotFound when there is none, DataLoss when it fails its checks.
    """
    tag = tag or latest_tag(directory, shard_id)
    if tag is None:
        raise NotFound(f"no snapshot in {shard_dir(directory, shard_id)}")
    path = snapshot_path(directory, shard_id, tag)
    if not path.exists():
        raise NotFound(f"snapshot tag {tag!r} not found at {path}")
    reader = _open(path)
    field = reader.schema.field("row").type
    total = sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
    rows = np.empty((total, field.list_size), dtype=field.value_type.to_pandas_dtype())
    metadata, _ = read_into(path, rows)
    log_path = own_segment(directory, shard_id, path, metadata)
    if log_path is not None:

        def apply(record):
            rows[record.local] = record.rows

        update_log.read_records(log_path, rows.shape[1], rows.dtype, apply, stop=metadata["log_end"])
    return rows, metadata, path


def snapshots_newest_first(directory: str | os.PathLike, shard_id: int) -> list[Path]:
    folder = shard_dir(directory, shard_id)
    if not folder.is_dir():
        return []
    return sorted(folder.glob("*.arrow"), key=lambda p: p.stat().st_mtime_ns, reverse=True)


def prune(directory: str | os.PathLike, shard_id: int, keep: int, periodic_keep: int) -> list[Path]:
    """Delete all but the `keep` newest named snapshots (0: keep all) and all but the
    `periodic_keep` newest ``periodic-*`` ones; each kind counts only among itself, and
    the one LATEST names is never deleted. Returns what was deleted."""
    newest = latest_tag(directory, shard_id)
    files = snapshots_newest_first(directory, shard_id)
    periodic = [p for p in files if p.stem.startswith(PERIODIC_PREFIX)]
    named = [p for p in files if not p.stem.startswith(PERIODIC_PREFIX)]
    doomed = (named[keep:] if keep > 0 else []) + (periodic[periodic_keep:] if periodic_keep > 0 else [])
    doomed = [p for p in doomed if p.stem != newest]
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed
