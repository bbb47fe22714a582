"""One shard of the memory bank: storage and the math, no gRPC.

Global index g lives on shard ``g % S`` at local row ``g // S``. Every method takes
and returns global indices, validates its whole request before touching a row,
and raises the domain errors of :mod:`bank_server.errors`:

- ``InvalidArgument``: bad index (out of [0, N), another shard's, duplicated in an
  update), wrong shape/dim, non-finite values, momentum outside [0, 1), bad k or
  temperature.
- ``FailedPrecondition``: a snapshot of another layout at restore.
- ``NotFound``: no snapshot with that tag.

Rows are unit vectors stored as float16 or float32; all math runs in float32.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bank_server import snapshot as snapshots
from bank_server import validate
from bank_server.errors import FailedPrecondition, InvalidArgument

DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16)}
# Blocks bound the temporaries of the full-bank scans to about 16 MiB.
_SCAN_ELEMENTS = 1 << 22
# (client_id, sequence) pairs remembered for idempotent retries.
_DEDUP_WINDOW = 1 << 16
# What a shard process may hold at once: a Restore reads the snapshot beside the live
# rows, so its rows twice, plus the process itself (about 100 MiB idle: Python, gRPC,
# numpy, pyarrow; message buffers and scan temporaries come on top).
RESTORE_COPIES = 2
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
    return RESTORE_COPIES * rows_held * dim * DTYPES[dtype].itemsize + PROCESS_BYTES


def initial_rows(layout: Layout, seed: int) -> np.ndarray:
    """Lemniscate's init, uniform in [-1/sqrt(D/3), 1/sqrt(D/3)], projected onto the
    unit sphere so every row satisfies the bank's invariant from the start."""
    rng = np.random.default_rng([seed, layout.shard_id])
    bound = 1.0 / np.sqrt(layout.dim / 3.0)
    rows = np.empty((layout.rows_held, layout.dim), dtype=DTYPES[layout.dtype])
    block = max(1, _SCAN_ELEMENTS // layout.dim)
    for begin in range(0, layout.rows_held, block):
        n = min(block, layout.rows_held - begin)
        values = rng.random((n, layout.dim), dtype=np.float32) * np.float32(2 * bound) - np.float32(bound)
        rows[begin:begin + n] = _normalize(values)
    return rows


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
    def __init__(self, layout: Layout, rows: np.ndarray, *, seed: int = 0):
        if rows.shape != (layout.rows_held, layout.dim) or rows.dtype != DTYPES[layout.dtype]:
            raise FailedPrecondition(
                f"rows {rows.shape} {rows.dtype} do not fit layout "
                f"({layout.rows_held}, {layout.dim}) {layout.dtype}")
        self.layout = layout
        self.seed = seed
        self.restored_from: Path | None = None
        self._rows = rows
        self._rng = np.random.default_rng([seed, layout.shard_id, 1])
        self._lock = threading.Lock()
        self._seen: OrderedDict[tuple[str, int], None] = OrderedDict()
        self.updates_applied = 0
        self.rows_updated = 0
        self.last_snapshot_tag = ""

    @classmethod
    def create(cls, layout: Layout, seed: int = 0) -> "Shard":
        return cls(layout, initial_rows(layout, seed), seed=seed)

    # -- validation -------------------------------------------------------------

    def to_local(self, indices: np.ndarray, field: str = "indices") -> np.ndarray:
        """Local rows of global `indices`; InvalidArgument if any is not this shard's."""
        indices = validate.indices(indices, self.layout.total_rows, field)
        s, sid = self.layout.num_shards, self.layout.shard_id
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
            return self._update_locked(local, features, momentum, client_id, sequence)

    def _update_locked(self, local, features, momentum, client_id, sequence) -> bool:
        key = (client_id, int(sequence))
        if client_id:
            if key in self._seen:
                return False
            self._seen[key] = None
            if len(self._seen) > _DEDUP_WINDOW:
                self._seen.popitem(last=False)
        # In place in float32: one cast of the old rows in, one to the storage dtype out.
        m = np.float32(momentum)
        mixed = as_float32(self._gather(local))  # a new array either way: the gather copies
        mixed *= m
        mixed += features.astype(np.float32, copy=False) * (np.float32(1) - m)
        mixed /= np.maximum(np.linalg.norm(mixed, axis=1, keepdims=True), np.float32(1e-12))
        self._rows[local] = mixed.astype(self._rows.dtype, copy=False)
        self.updates_applied += 1
        self.rows_updated += len(local)
        return True

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
            applied = self._update_locked(*prepared) if prepared else False
            rows = None if local is None else self._gather(local)
            sample = self._sample_locked(sample_k, sample_seed) if sample_k else (None, None)
        return applied, rows, *sample

    def _queries(self, queries, field="queries") -> np.ndarray:
        return validate.matrix(queries, self.layout.dim, field).astype(np.float32, copy=False)

    def _blocks(self, batch: int):
        block = max(256, _SCAN_ELEMENTS // max(batch, self.layout.dim))
        for begin in range(0, self.layout.rows_held, block):
            yield begin, as_float32(self._rows[begin:begin + block])

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
                logits = q @ rows.T                       # (B, block)
                new_m = np.maximum(m, logits.max(axis=1))
                scale = np.exp(m - new_m)                 # exp(-inf) = 0 on the first block
                e = np.exp(logits - new_m[:, None])       # (B, block)
                s = s * scale + e.sum(axis=1)
                w = w * scale[:, None] + e @ rows         # (B, D)
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

    def snapshot(self, directory: str | Path, tag: str, keep: int = 0):
        """Write this shard to ``<directory>/shard-<id>/<tag>.arrow``, then keep only the
        `keep` newest snapshots (0: all): (path, bytes, seconds)."""
        snapshots.check_tag(tag)
        with self._lock:
            metadata = {
                "layout": asdict(self.layout),
                "tag": tag,
                "updates_applied": self.updates_applied,
                "rows_updated": self.rows_updated,
                "seen": [[c, s] for c, s in self._seen],
            }
            result = snapshots.write(directory, self.layout.shard_id, tag, self._rows, metadata)
            self.last_snapshot_tag = tag
        snapshots.prune(directory, self.layout.shard_id, keep)
        return result

    @classmethod
    def restore(cls, layout: Layout, directory: str | Path, tag: str | None = None, seed: int = 0) -> "Shard":
        """The shard saved as `tag` (default: the newest). FailedPrecondition if its
        layout differs from `layout`; NotFound if there is no such snapshot."""
        rows, metadata, path = snapshots.read(directory, layout.shard_id, tag)
        saved = Layout(**metadata["layout"])
        if saved != layout:
            diffs = ", ".join(f"{k}: snapshot {v} vs server {getattr(layout, k)}"
                              for k, v in asdict(saved).items() if v != getattr(layout, k))
            raise FailedPrecondition(f"snapshot {path} has another layout ({diffs})")
        shard = cls(layout, rows, seed=seed)
        shard.updates_applied = metadata["updates_applied"]
        shard.rows_updated = metadata["rows_updated"]
        shard._seen = OrderedDict(((c, s), None) for c, s in metadata["seen"])
        shard.last_snapshot_tag = metadata["tag"]
        shard.restored_from = path
        return shard

    def replace_with(self, other: "Shard") -> None:
        """Take over `other`'s state (a Restore RPC on a live server)."""
        if other.layout != self.layout:
            raise FailedPrecondition("restored shard has another layout")
        with self._lock:
            self._rows = other._rows
            self._seen = other._seen
            self.updates_applied = other.updates_applied
            self.rows_updated = other.rows_updated
            self.last_snapshot_tag = other.last_snapshot_tag
            self.restored_from = other.restored_from

    def describe(self) -> dict:
        return {
            **asdict(self.layout),
            "rows_held": self.layout.rows_held,
            "updates_applied": self.updates_applied,
            "rows_updated": self.rows_updated,
            "last_snapshot_tag": self.last_snapshot_tag,
        }
