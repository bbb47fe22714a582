"""One shard of the memory bank: storage and the math, no gRPC.

Global index g lives on shard ``g % S`` at local row ``g // S``. Every method takes
and returns global indices, validates its whole request before touching a row,
and raises the domain errors of :mod:`bank_server.errors`:

- ``InvalidArgument``: bad index (out of [0, N), another shard's, duplicated in an
  update), wrong shape/dim, non-finite values, momentum outside [0, 1), bad k or
  temperature.
- ``FailedPrecondition``: a snapshot of another layout at restore.
- ``NotFound``: no snapshot with that tag.
- ``DataLoss``: a snapshot or log segment that fails its checks (named in the message).

Rows are unit vectors stored as float16 or float32; all math runs in float32.

Durability: a shard may be given an :class:`~bank_server.update_log.UpdateLog`; every
applied update is then appended to it, under the lock and before any row changes, and
the caller returns only once the record is as durable as the log's fsync mode promises.
The shard stays free of gRPC; it touches no files but its snapshots and its log.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bank_server import snapshot as snapshots
from bank_server import update_log, validate
from bank_server.errors import DataLoss, FailedPrecondition, InvalidArgument, NotFound

log = logging.getLogger(__name__)

DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16)}
# Blocks bound the temporaries of the full-bank scans to about 16 MiB.
_SCAN_ELEMENTS = 1 << 22
# (client_id, sequence) pairs remembered for idempotent retries.
_DEDUP_WINDOW = 1 << 16
# A snapshot copies this many rows per hold of the lock (64k x 128 float16 = 16 MiB, a
# few ms), so a Step waits at most that long, never for a whole snapshot.
SNAPSHOT_BLOCK_ROWS = 1 << 16
# Periodic snapshots (`--snapshot-every`) kept: the newest, and one to fall back on.
PERIODIC_KEPT = 2
# What a shard process may hold at once: its rows once (a Restore reads into the live
# array; a snapshot copies a block at a time: the block and Arrow's view of it count
# twice), plus the process itself (about 100 MiB idle: Python, gRPC, numpy, pyarrow;
# message buffers and scan temporaries come on top).
RESTORE_COPIES = 1
SNAPSHOT_BLOCK_COPIES = 2
PROCESS_BYTES = 256 << 20


@dataclass(frozen=True)
class Layout:
    shard_id: int
    num_shards: int
    total_rows: int
    dim: int
    dtype: str = "float16"

    def __post_init__(self):
        if self.num_shards < 1:
            raise InvalidArgument(f"num_shards must be >= 1, got {self.num_shards}")
        if not 0 <= self.shard_id < self.num_shards:
            raise InvalidArgument(f"shard_id must be in [0, {self.num_shards}), got {self.shard_id}")
        if self.total_rows < self.num_shards:
            raise InvalidArgument(f"rows ({self.total_rows}) must be >= num_shards ({self.num_shards})")
        if self.dim < 1:
            raise InvalidArgument(f"dim must be >= 1, got {self.dim}")
        if self.dtype not in DTYPES:
            raise InvalidArgument(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")

    @property
    def rows_held(self) -> int:
        return rows_on_shard(self.total_rows, self.num_shards, self.shard_id)


def rows_on_shard(total_rows: int, num_shards: int, shard_id: int) -> int:
    return (total_rows - shard_id + num_shards - 1) // num_shards


def memory_bytes(rows_held: int, dim: int, dtype: str) -> int:
    """The most one shard process of `rows_held` rows may hold at once."""
    row_bytes = dim * DTYPES[dtype].itemsize
    block = SNAPSHOT_BLOCK_COPIES * min(rows_held, SNAPSHOT_BLOCK_ROWS)
    return (RESTORE_COPIES * rows_held + block) * row_bytes + PROCESS_BYTES


def initial_rows(layout: Layout, seed: int) -> np.ndarray:
    """Lemniscate's init, uniform in [-1/sqrt(D/3), 1/sqrt(D/3)], projected onto the
    unit sphere so every row satisfies the bank's invariant from the start."""
    rows = np.empty((layout.rows_held, layout.dim), dtype=DTYPES[layout.dtype])
    for begin, block in initial_blocks(layout, seed):
        rows[begin : begin + len(block)] = block
    return rows


def initial_blocks(layout: Layout, seed: int):
    """`initial_rows` a block at a time, as (first local row, rows in the storage dtype)."""
    rng = np.random.default_rng([seed, layout.shard_id])
    bound = 1.0 / np.sqrt(layout.dim / 3.0)
    block = max(1, _SCAN_ELEMENTS // layout.dim)
    for begin in range(0, layout.rows_held, block):
        n = min(block, layout.rows_held - begin)
        values = rng.random((n, layout.dim), dtype=np.float32) * np.float32(2 * bound) - np.float32(bound)
        yield begin, _normalize(values).astype(DTYPES[layout.dtype])


# numpy's float16 -> float32 cast runs at scalar speed in this build (about 40 us for a
# 256 x 128 batch); a gather from a table of all 65,536 float16 values gives the same
# bits in about half the time. (No such path was found for float32 -> float16.)
_HALF_TO_FLOAT = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)


def as_float32(rows: np.ndarray) -> np.ndarray:
    """`rows` in float32: a new array for float16, `rows` itself when already float32."""
    if rows.dtype == np.float16:
        return np.take(_HALF_TO_FLOAT, rows.view(np.uint16))
    return rows.astype(np.float32, copy=False)


def _normalize(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, np.float32(1e-12))


class Shard:
    def __init__(self, layout: Layout, rows: np.ndarray, *, seed: int = 0, log=None):
        if rows.shape != (layout.rows_held, layout.dim) or rows.dtype != DTYPES[layout.dtype]:
            raise FailedPrecondition(
                f"rows {rows.shape} {rows.dtype} do not fit layout ({layout.rows_held}, {layout.dim}) {layout.dtype}"
            )
        self.layout = layout
        self.seed = seed
        self.restored_from: Path | None = None
        self._rows = rows
        self._rng = np.random.default_rng([seed, layout.shard_id, 1])
        self._lock = threading.Lock()
        self._snapshot_lock = threading.Lock()  # one snapshot or Restore at a time
        self._log = log  # an UpdateLog, or None: updates live in memory only
        self._seen: OrderedDict[tuple[str, int], None] = OrderedDict()
        self.updates_applied = 0
        self.rows_updated = 0
        self.last_snapshot_tag = ""
        self.damaged: str | None = None  # why the rows cannot be trusted (a Restore failed half-way)
        self.last_snapshot_time: float | None = None
        self.last_snapshot_seconds: float | None = None

    @classmethod
    def create(cls, layout: Layout, seed: int = 0) -> Shard:
        return cls(layout, initial_rows(layout, seed), seed=seed)

    @property
    def log(self):
        return self._log

    def attach_log(self, log) -> None:
        """Log every update from now on to `log` (an UpdateLog)."""
        with self._lock:
            self._log = log

    # -- validation -------------------------------------------------------------

    def to_local(self, indices: np.ndarray, field: str = "indices") -> np.ndarray:
        """Local rows of global `indices`; InvalidArgument if any is not this shard's.
        In a one-shard bank they are `indices` themselves, not a copy: the caller leaves
        them as they are until the call returns."""
        indices = validate.indices(indices, self.layout.total_rows, field)
        s, sid = self.layout.num_shards, self.layout.shard_id
        if s == 1:  # the bank's one shard: every row is its own, at its own index
            return indices
        wrong = indices % s != sid
        if wrong.any():
            where = int(np.argmax(wrong))
            g = int(indices[where])
            raise InvalidArgument(f"{field}[{where}] = {g} belongs to shard {g % s}, not shard {sid}")
        return indices // s

    def _check_sample_k(self, k: int, field: str = "k") -> None:
        validate.count(k, 1, self.layout.total_rows, field, "the bank's rows")

    def _prepare_update(self, indices, features, momentum):
        indices, features = validate.update(indices, features, momentum, self.layout.total_rows, self.layout.dim)
        return self.to_local(indices, "update.indices"), features

    # -- operations -------------------------------------------------------------

    def lookup(self, indices: np.ndarray) -> np.ndarray:
        local = self.to_local(indices)
        with self._lock:
            return self._gather(local)

    def sample(self, k: int, seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """k rows drawn uniformly with replacement from this shard: (global indices, rows)."""
        self._check_sample_k(k)
        with self._lock:
            return self._sample_locked(k, seed)

    def _gather(self, local: np.ndarray) -> np.ndarray:
        # np.take is ~3x faster than fancy indexing for random rows of a large bank.
        return np.take(self._rows, local, axis=0)

    def _sample_locked(self, k, seed):
        rng = self._rng if seed is None else np.random.default_rng(seed)
        local = rng.integers(0, self.layout.rows_held, size=k, dtype=np.int64)
        return local * self.layout.num_shards + self.layout.shard_id, self._gather(local)

    def momentum_update(self, indices, features, momentum: float, client_id: str = "", sequence: int = 0) -> bool:
        """``v <- normalize(m v + (1 - m) f)`` for each index; False if (client_id,
        sequence) was applied before (a retry), in which case nothing changes."""
        local, features = self._prepare_update(indices, features, momentum)
        with self._lock:
            applied, ticket = self._update_locked(local, features, momentum, client_id, sequence)
        self._wait_durable(ticket)
        return applied

    def _wait_durable(self, ticket: int) -> None:
        if ticket:
            self._log.wait_durable(ticket)

    def _update_locked(self, local, features, momentum, client_id, sequence) -> tuple[bool, int]:
        """Apply one update: (applied, the log's ticket for it, 0 when not logged)."""
        key = (client_id, int(sequence))
        if client_id and key in self._seen:
            # A retry: its first call may still wait for its fsync (or never answered);
            # the retry's answer must not come before the record is durable either.
            return False, (self._log.written if self._log is not None else 0)
        # In place in float32: one cast of the old rows in, one to the storage dtype out.
        m = np.float32(momentum)
        mixed = as_float32(self._gather(local))  # a new array either way: the gather copies
        mixed *= m
        mixed += features.astype(np.float32, copy=False) * (np.float32(1) - m)
        mixed /= np.maximum(np.linalg.norm(mixed, axis=1, keepdims=True), np.float32(1e-12))
        new = mixed.astype(self._rows.dtype, copy=False)
        # Logged before any row changes: a failed append leaves the shard as it was.
        ticket = self._log.append(local, new, client_id, key[1]) if self._log is not None else 0
        self._rows[local] = new
        self._remember(key)
        self.updates_applied += 1
        self.rows_updated += len(local)
        return True, ticket

    def _remember(self, key) -> None:
        if key[0]:
            self._seen[key] = None
            if len(self._seen) > _DEDUP_WINDOW:
                self._seen.popitem(last=False)

    def apply_logged(self, record) -> None:
        """Replay one update-log record (recovery, Restore; call before serving or under
        the lock): the rows it wrote, and its (client_id, sequence) into the retry memory,
        so that a client's retry of an update acknowledged before a crash is still
        recognised. Replaying a record twice changes nothing (it holds results); it is
        counted once."""
        key = (record.client_id, int(record.sequence))
        if len(record.local) and not (0 <= record.local.min() and record.local.max() < self.layout.rows_held):
            raise update_log.LogCorrupt(
                f"update-log record (client {record.client_id!r}, sequence {record.sequence}) writes local rows "
                f"{int(record.local.min())}..{int(record.local.max())}, outside this shard's "
                f"[0, {self.layout.rows_held})"
            )
        self._rows[record.local] = record.rows
        if key[0] and key in self._seen:
            return
        self._remember(key)
        self.updates_applied += 1
        self.rows_updated += len(record.local)

    def step(self, update=None, lookup_indices=None, sample_k: int = 0, sample_seed: int | None = None):
        """Update, then lookup, then sample, as one request validated whole.

        `update` is None or ``(indices, features, momentum, client_id, sequence)``.
        Returns (update_applied, rows or None, sample indices or None, sample rows or None).
        """
        prepared = None
        if update is not None and len(update[0]):
            indices, features, momentum, client_id, sequence = update
            prepared = (*self._prepare_update(indices, features, momentum), momentum, client_id, sequence)
        local = None if lookup_indices is None else self.to_local(lookup_indices, "lookup_indices")
        if sample_k:
            self._check_sample_k(sample_k, "sample_k")
        with self._lock:
            applied, ticket = self._update_locked(*prepared) if prepared else (False, 0)
            rows = None if local is None else self._gather(local)
            sample = self._sample_locked(sample_k, sample_seed) if sample_k else (None, None)
        self._wait_durable(ticket)
        return applied, rows, *sample

    def _queries(self, queries, field="queries") -> np.ndarray:
        return validate.matrix(queries, self.layout.dim, field).astype(np.float32, copy=False)

    def _blocks(self, batch: int):
        block = max(256, _SCAN_ELEMENTS // max(batch, self.layout.dim))
        for begin in range(0, self.layout.rows_held, block):
            yield begin, as_float32(self._rows[begin : begin + block])

    def partition_sums(self, queries: np.ndarray, temperature: float):
        """Per query q over this shard's rows, with logits l_j = v_j . q / tau:
        ``m = max_j l_j``, ``S = sum_j exp(l_j - m)``, ``W = sum_j exp(l_j - m) v_j``.

        Streams over the rows in blocks, rescaling the running sums when the max
        grows (online log-sum-exp), so memory stays O(B x block).
        """
        q = self._queries(queries)
        if not (np.isfinite(temperature) and temperature > 0):
            raise InvalidArgument(f"temperature must be > 0, got {temperature}")
        q = q / np.float32(temperature)
        b = len(q)
        m = np.full(b, -np.inf, dtype=np.float32)
        s = np.zeros(b, dtype=np.float32)
        w = np.zeros((b, self.layout.dim), dtype=np.float32)
        with self._lock:
            for _, rows in self._blocks(b):
                logits = q @ rows.T  # (B, block)
                new_m = np.maximum(m, logits.max(axis=1))
                scale = np.exp(m - new_m)  # exp(-inf) = 0 on the first block
                e = np.exp(logits - new_m[:, None])  # (B, block)
                s = s * scale + e.sum(axis=1)
                w = w * scale[:, None] + e @ rows  # (B, D)
                m = new_m
        return m, s, w

    def topk(self, queries: np.ndarray, k: int):
        """This shard's k most cosine-similar rows per query: (similarities (B, k)
        descending, global indices (B, k))."""
        q = self._queries(queries)
        validate.count(k, 1, self.layout.rows_held, "k", "rows on this shard")
        norms = np.linalg.norm(q, axis=1, keepdims=True)
        if (norms == 0).any():
            raise InvalidArgument(f"queries[{int(np.argmax(norms[:, 0] == 0))}] is all zeros")
        q = q / norms
        b = len(q)
        best_sim = np.full((b, 0), -np.inf, dtype=np.float32)
        best_idx = np.zeros((b, 0), dtype=np.int64)
        with self._lock:
            for begin, rows in self._blocks(b):
                sims = np.concatenate([best_sim, q @ rows.T], axis=1)
                local = np.arange(begin, begin + len(rows), dtype=np.int64)
                idx = np.concatenate([best_idx, np.broadcast_to(local, (b, len(rows)))], axis=1)
                if sims.shape[1] > k:
                    keep = np.argpartition(-sims, k - 1, axis=1)[:, :k]
                    sims = np.take_along_axis(sims, keep, axis=1)
                    idx = np.take_along_axis(idx, keep, axis=1)
                best_sim, best_idx = sims, idx
        order = np.argsort(-best_sim, axis=1, kind="stable")
        best_sim = np.take_along_axis(best_sim, order, axis=1)
        best_idx = np.take_along_axis(best_idx, order, axis=1)
        return best_sim, best_idx * self.layout.num_shards + self.layout.shard_id

    # -- persistence ------------------------------------------------------------

    def snapshot(self, directory: str | Path, tag: str, keep: int = 0, periodic_keep: int = PERIODIC_KEPT):
        """Write this shard to ``<directory>/shard-<id>/<tag>.arrow``, point LATEST at it,
        then prune (`keep` newest named snapshots, 0: all; `periodic_keep` newest
        ``periodic-*`` ones): (path, bytes, seconds).

        Fuzzy, not stop-the-world. Under the lock the log rotates to a new segment and the
        counters are taken; then the rows are copied SNAPSHOT_BLOCK_ROWS at a time, each
        under a short hold of the lock, and written to disk outside it. Updates go on
        meanwhile, so a block copied late may already hold updates that the new segment
        records too. That is harmless because records hold results and are replayed in
        order: the file plus the segment's records ``[0, log_end)`` (``log_end``: the
        segment's length when the last block was copied) is exactly the shard at that
        moment, and the file plus the whole timeline from that segment on is exactly the
        shard now. LATEST says so: ``{"tag": tag, "log": segment, "from": log_end}``.

        DataLoss, writing nothing, when the shard is damaged (a Restore failed half-way):
        its rows are not a state the bank was ever in.
        """
        snapshots.check_tag(tag)
        sid = self.layout.shard_id
        with self._snapshot_lock:
            if self.damaged:
                raise DataLoss(
                    f"shard {sid} is damaged ({self.damaged}): not snapshotting rows it cannot vouch "
                    "for; restart it to recover from LATEST and its update log"
                )
            with self._lock:
                segment = self._log.rotate() if self._log is not None else None
                metadata = snapshots.metadata(
                    asdict(self.layout), tag, segment, self.updates_applied, self.rows_updated, self._seen
                )
            if self._log is not None:
                self._log.seal()  # the segment before is whole on disk before anything names it
            path, nbytes, seconds, log_end = snapshots.write(
                directory, sid, tag, metadata, self.layout.dim, self._rows.dtype, self._copy_blocks()
            )
            snapshots.write_latest(directory, sid, tag, segment, log_end)
            self.last_snapshot_tag = tag
            self.last_snapshot_time = time.time()
            self.last_snapshot_seconds = seconds
            self._prune(directory, keep, periodic_keep)
        return path, nbytes, seconds

    def _copy_blocks(self):
        """The rows a block at a time, each copied under its own short hold of the lock,
        with how many records the log's active segment held then."""
        for begin in range(0, self.layout.rows_held, SNAPSHOT_BLOCK_ROWS):
            with self._lock:
                block = self._rows[begin : begin + SNAPSHOT_BLOCK_ROWS].copy()
                position = self._log.records if self._log is not None else 0
            yield block, position

    def _prune(self, directory, keep: int, periodic_keep: int) -> None:
        sid = self.layout.shard_id
        snapshots.prune(directory, sid, keep, periodic_keep)
        if self._log is None:
            return
        starts = []
        for path in snapshots.snapshots_newest_first(directory, sid):
            try:
                segment = snapshots.read_metadata(path).get("log_segment")
            except (DataLoss, NotFound) as error:  # a broken snapshot keeps no log alive; say so
                log.warning("pruning the update log: %s", error)
                continue
            if segment:
                starts.append(segment)
        pointer = snapshots.read_latest(directory, sid)
        if pointer and pointer["log"]:
            starts.append(pointer["log"])
        for path in update_log.prune_segments(self._log.folder, starts, self._log.segment):
            log.info("removed update-log segment %s with the snapshots it belonged to", path)

    def _check_snapshot(self, metadata: dict, path: Path) -> None:
        saved = Layout(**metadata["layout"])
        if saved != self.layout:
            diffs = ", ".join(
                f"{k}: snapshot {v} vs server {getattr(self.layout, k)}"
                for k, v in asdict(saved).items()
                if v != getattr(self.layout, k)
            )
            raise FailedPrecondition(f"snapshot {path} has another layout ({diffs})")

    def _load_locked(self, path: Path, directory) -> None:
        """The snapshot's rows into the live array (checked as they come), then its own
        log segment up to its consistency point, so the rows are exactly the shard when
        the snapshot ended."""
        metadata, _ = snapshots.read_into(path, self._rows, self.layout.rows_held)
        self.updates_applied = metadata["updates_applied"]
        self.rows_updated = metadata["rows_updated"]
        self._seen = OrderedDict(((c, s), None) for c, s in metadata["seen"])
        segment, end = metadata.get("log_segment"), metadata["log_end"]
        own = self._own_log(directory, path, metadata)
        if own is not None:
            update_log.read_records(own, self.layout.dim, self._rows.dtype, self.apply_logged, stop=end)
        self.last_snapshot_tag = metadata["tag"]
        self.restored_from = path
        self.restored_log_position = (segment, end)

    def _checked_metadata(self, directory, tag: str | None, whole: bool = True) -> tuple[Path, dict]:
        """Path and metadata of snapshot `tag` (default: LATEST's), its layout checked,
        and with `whole` every row's checksum and its log segment too, before anything
        changes (loading checks them again as it goes)."""
        tag = tag or snapshots.latest_tag(directory, self.layout.shard_id)
        if tag is None:
            raise NotFound(f"no snapshot in {snapshots.shard_dir(directory, self.layout.shard_id)}")
        path = snapshots.snapshot_path(directory, self.layout.shard_id, tag)
        if not path.exists():
            raise NotFound(f"snapshot tag {tag!r} not found at {path}")
        metadata = snapshots.read_metadata(path)
        self._check_snapshot(metadata, path)
        if not whole:
            return path, metadata
        metadata, _ = snapshots.read_into(path, None, self.layout.rows_held)
        own = self._own_log(directory, path, metadata)
        if own is not None:
            update_log.read_records(
                own, self.layout.dim, self._rows.dtype, lambda record: None, stop=metadata["log_end"]
            )
        return path, metadata

    def _own_log(self, directory, path: Path, metadata: dict) -> Path | None:
        """The log segment that completes snapshot `path`, its layout checked; None if none."""
        own = snapshots.own_segment(directory, self.layout.shard_id, path, metadata)
        if own is not None:
            update_log.check_layout(own, self.layout)
        return own

    @classmethod
    def restore(cls, layout: Layout, directory: str | Path, tag: str | None = None, seed: int = 0) -> Shard:
        """A new shard holding snapshot `tag` (default: the one LATEST names), exactly as
        it was when the snapshot ended. FailedPrecondition if its layout differs from
        `layout`; NotFound if there is no such snapshot; DataLoss if it fails its checks."""
        shard = cls(layout, np.empty((layout.rows_held, layout.dim), DTYPES[layout.dtype]), seed=seed)
        # A new shard's rows are its own: a bad snapshot found while loading loses nothing.
        path, _ = shard._checked_metadata(directory, tag, whole=False)
        shard._load_locked(path, directory)
        return shard

    def restore_in_place(self, directory: str | Path, tag: str | None = None, loading=None) -> Path:
        """Roll this shard back to snapshot `tag` (a Restore RPC), reading into the live
        rows: no second copy. The snapshot is checked whole first, so a bad one changes
        nothing. Then, under the lock, the rows are loaded, the log starts a new
        generation and LATEST moves to the snapshot and that generation: a crash after
        the Restore recovers the restored timeline, not the abandoned one.

        `loading()`, if given, is called once the snapshot is checked and this Restore
        holds the snapshot lock, just before the live rows change (the servicer turns
        calls away from then on). If the load, the new generation or LATEST fails, the
        rows and the log no longer agree with LATEST: the shard is marked `damaged`
        (every call, snapshot included, is refused until a restart recovers it)."""
        sid = self.layout.shard_id
        with self._snapshot_lock:
            if self.damaged:
                raise DataLoss(f"shard {sid} is damaged ({self.damaged}); restart it")
            path, metadata = self._checked_metadata(directory, tag)
            if loading is not None:
                loading()
            with self._lock:
                try:
                    self._load_locked(path, directory)
                    if self._log is not None:
                        segment = self._log.rotate(new_generation=True, base=metadata["tag"])
                        snapshots.write_latest(directory, sid, metadata["tag"], segment, 0)
                    else:
                        snapshots.write_latest(directory, sid, metadata["tag"], None, 0)
                except Exception as error:  # checked whole just before: a disk failing now
                    self.damaged = f"a Restore of {path} failed half-way ({error})"
                    log.error(
                        "shard %d: %s; restart it to recover its last state from LATEST and the log", sid, self.damaged
                    )
                    raise DataLoss(
                        f"{self.damaged}; the shard refuses every call until a restart recovers it "
                        "from LATEST and its update log"
                    ) from error
        return path

    def describe(self) -> dict:
        return {
            **asdict(self.layout),
            "rows_held": self.layout.rows_held,
            "updates_applied": self.updates_applied,
            "rows_updated": self.rows_updated,
            "last_snapshot_tag": self.last_snapshot_tag,
        }
