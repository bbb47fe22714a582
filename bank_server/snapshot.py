"""Shard snapshots as uncompressed Arrow IPC files (memory-mappable).

Layout on disk: ``<dir>/shard-<id>/<tag>.arrow`` plus a ``LATEST`` file naming the
newest tag. Both are written to a temporary file, fsynced and renamed, so a crash
leaves either the old snapshot or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from bank_server.errors import InvalidArgument, NotFound

TAG_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,128}")
METADATA_KEY = b"instdisc.bank"
_BATCH_ROWS = 1 << 20


def check_tag(tag: str) -> str:
    if not TAG_PATTERN.fullmatch(tag or "") or tag in (".", ".."):
        raise InvalidArgument(f"tag must match {TAG_PATTERN.pattern}, got {tag!r}")
    return tag


def shard_dir(directory: str | os.PathLike, shard_id: int) -> Path:
    return Path(directory) / f"shard-{shard_id:05d}"


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_durably(tmp: Path, final: Path) -> None:
    _fsync_path(tmp)
    os.replace(tmp, final)
    _fsync_path(final.parent)


def write(directory: str | os.PathLike, shard_id: int, tag: str, rows: np.ndarray, metadata: dict) -> tuple[Path, int, float]:
    """Write `rows` (R, D) with `metadata`; return (path, bytes, seconds)."""
    check_tag(tag)
    start = time.perf_counter()
    folder = shard_dir(directory, shard_id)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{tag}.arrow"
    tmp = folder / f".{tag}.arrow.tmp-{os.getpid()}"
    dim = rows.shape[1]
    value_type = pa.from_numpy_dtype(rows.dtype)
    schema = pa.schema([pa.field("row", pa.list_(value_type, dim))],
                       metadata={METADATA_KEY: json.dumps(metadata).encode()})
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for begin in range(0, max(len(rows), 1), _BATCH_ROWS):
            chunk = np.ascontiguousarray(rows[begin:begin + _BATCH_ROWS])
            values = pa.array(chunk.reshape(-1), type=value_type)
            column = pa.FixedSizeListArray.from_arrays(values, dim)
            writer.write_batch(pa.record_batch([column], schema=schema))
    _replace_durably(tmp, final)
    latest_tmp = folder / f".LATEST.tmp-{os.getpid()}"
    latest_tmp.write_text(tag)
    _replace_durably(latest_tmp, folder / "LATEST")
    return final, final.stat().st_size, time.perf_counter() - start


def prune(directory: str | os.PathLike, shard_id: int, keep: int) -> list[Path]:
    """Delete all but the `keep` newest snapshots of a shard (never the LATEST one);
    returns what was deleted. keep <= 0 keeps everything."""
    if keep <= 0:
        return []
    folder = shard_dir(directory, shard_id)
    newest = latest_tag(directory, shard_id)
    files = sorted(folder.glob("*.arrow"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
    doomed = [p for p in files[keep:] if p.stem != newest]
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


def latest_tag(directory: str | os.PathLike, shard_id: int) -> str | None:
    pointer = shard_dir(directory, shard_id) / "LATEST"
    return pointer.read_text().strip() if pointer.exists() else None


def read_metadata(path: Path) -> dict:
    with pa.memory_map(str(path)) as source:
        schema = pa.ipc.open_file(source).schema
    return json.loads(schema.metadata[METADATA_KEY])


def read(directory: str | os.PathLike, shard_id: int, tag: str | None = None) -> tuple[np.ndarray, dict, Path]:
    """Rows, metadata and path of snapshot `tag` (default: the newest).

    Raises NotFound when there is none.
    """
    tag = tag or latest_tag(directory, shard_id)
    if tag is None:
        raise NotFound(f"no snapshot in {shard_dir(directory, shard_id)}")
    path = shard_dir(directory, shard_id) / f"{check_tag(tag)}.arrow"
    if not path.exists():
        raise NotFound(f"snapshot tag {tag!r} not found at {path}")
    with pa.memory_map(str(path)) as source:
        reader = pa.ipc.open_file(source)
        metadata = json.loads(reader.schema.metadata[METADATA_KEY])
        dim = reader.schema.field("row").type.list_size
        dtype = reader.schema.field("row").type.value_type.to_pandas_dtype()
        total = sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
        rows = np.empty((total, dim), dtype=dtype)
        offset = 0
        for i in range(reader.num_record_batches):
            column = reader.get_batch(i).column(0)
            values = column.flatten().to_numpy(zero_copy_only=False)
            rows[offset:offset + len(column)] = values.reshape(-1, dim)
            offset += len(column)
    return rows, metadata, path
