"""A shard's start: what its snapshot folder says the shard is, or a refusal saying why.

Recovery = the base LATEST names (a snapshot, or the seeded initial rows) + the update
log from LATEST's segment and record on, following each segment's successor
(:mod:`bank_server.update_log`). The last segment's torn last record, if any, is cut off
(its update was never acknowledged) and reported.

Nothing is lost silently. A LATEST or a log that cannot be read, or a snapshot that
fails its checks, raises :class:`RecoveryRefused` naming the file and what is wrong,
unless the operator asked otherwise:

- ``fallback=True`` (``--fallback-snapshot``): when the snapshot LATEST names is bad,
  use the newest good snapshot from which the log still reaches the current state (its
  updates are replayed, so nothing is lost if one is found);
- ``allow_fresh=True`` (``--allow-fresh``): start from the seeded rows instead.

Every log segment replayed is checked against the shard's layout (shard id, number of
shards, total rows, dim, dtype: its header records them); a log written for another
layout is refused by name. A segment whose creation a crash cut short (empty, or its
header cut short: it holds no record) and that nothing continues is removed, and the
start says so.

A folder with neither LATEST nor log segments starts fresh (with a warning naming any
snapshots it holds: without LATEST nothing says which one is current). One with log segments but
no LATEST (LATEST lost, or deleted by hand) is recovered from the log alone when its
oldest segment starts from the seeded initial rows (its header says so) and every
segment is on that one timeline: the rows of that seed plus the whole log are exactly
the shard. Otherwise what came before the oldest segment is gone, and the shard refuses
to serve, naming the folder and what is missing (``--allow-fresh`` starts from the
seeded rows; the segments are then pruned at the next snapshot). Starting these
segments over silently would lose every update they hold.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from pathlib import Path

from bank_server import snapshot as snapshots
from bank_server import update_log
from bank_server.errors import DataLoss, NotFound
from bank_server.shard import DTYPES, Layout, Shard, initial_rows

log = logging.getLogger(__name__)


class RecoveryRefused(DataLoss):
    """The shard cannot be brought back as it was; it must not serve. Not worth retrying:
    the same files give the same answer."""


@dataclass
class Recovery:
    """What a start recovered to, for the log line and the metrics."""

    source: str  # "snapshot epoch-3" / "initial rows (seed 0)"
    tag: str | None = None
    seed: int | None = None  # the initial rows' seed, when they are the base
    records_replayed: int = 0
    torn_bytes_dropped: int = 0
    segments: list[int] = field(default_factory=list)
    last_segment: int | None = None  # the segment the log continues
    base_seconds: float = 0.0  # loading the snapshot (or seeding the rows)
    replay_seconds: float = 0.0  # replaying the log
    # LATEST to write when recovery chose its base itself: tag, seed, and the log segment
    # and record it continues from (segment None: the new segment the server opens).
    new_pointer: dict | None = None
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        text = (
            f"recovered to {self.source} ({self.base_seconds:.2f} s) + {self.records_replayed} log record(s) "
            f"replayed from segment(s) {self.segments or 'none'} ({self.replay_seconds:.2f} s), "
            f"{self.torn_bytes_dropped} torn byte(s) dropped"
        )
        return "; ".join([text, *self.notes])


_ADVICE = (
    "refusing to serve; fix or move the file, or start with --fallback-snapshot (use the newest good "
    "snapshot the log still continues) or --allow-fresh (start from the seeded rows; the stored bank is "
    "not used)"
)


def recover(
    layout: Layout, directory: str | os.PathLike, seed: int, *, allow_fresh: bool = False, fallback: bool = False
) -> tuple[Shard, Recovery]:
    """The shard as its snapshot folder left it (see the module's docstring)."""
    folder = snapshots.shard_dir(directory, layout.shard_id)
    try:
        return _recover(layout, directory, folder, seed, fallback)
    except (DataLoss, NotFound) as error:
        if not allow_fresh:
            raise RecoveryRefused(f"shard {layout.shard_id}: {error}; {_ADVICE}") from error
        log.warning("shard %d: %s; starting from the seeded rows as --allow-fresh asks", layout.shard_id, error)
        recovery = _fresh(seed, f"--allow-fresh after: {error}")
        return Shard.create(layout, seed), recovery


def open_logged(
    layout: Layout,
    directory: str | os.PathLike,
    seed: int,
    fsync: str = "everysec",
    *,
    allow_fresh: bool = False,
    fallback: bool = False,
) -> tuple[Shard, Recovery]:
    """Recover the shard and give it a new log segment continuing the recovered
    timeline (LATEST rewritten when recovery chose the base itself): a shard ready to serve."""
    shard, recovery = recover(layout, directory, seed, allow_fresh=allow_fresh, fallback=fallback)
    folder = snapshots.shard_dir(directory, layout.shard_id)
    _remove_stale_temporaries(folder)
    if recovery.last_segment is not None:
        # The recovered segment is whole on disk before a new segment continues it: a
        # torn record is only accepted in the newest segment.
        update_log.fsync_file(update_log.segment_path(folder, recovery.last_segment))
    # A new timeline (no log continued) says what it starts from: the snapshot or the seeded rows.
    log_ = update_log.UpdateLog(
        snapshots.shard_dir(directory, layout.shard_id),
        layout,
        fsync,
        previous=recovery.last_segment,
        base=recovery.tag,
        seed=recovery.seed,
    )
    pointer = recovery.new_pointer
    if pointer is not None:
        snapshots.write_latest(
            directory,
            layout.shard_id,
            pointer["tag"],
            pointer["segment"] or log_.segment,
            pointer["from"],
            pointer["seed"],
        )
    shard.attach_log(log_)
    return shard, recovery


def _fresh(seed: int, why: str) -> Recovery:
    return Recovery(
        source=f"initial rows (seed {seed})",
        seed=seed,
        notes=[why],
        new_pointer={"tag": None, "seed": seed, "segment": None, "from": 0},
    )


def _recover(layout, directory, folder: Path, seed: int, fallback: bool) -> tuple[Shard, Recovery]:
    pointer = snapshots.read_latest(directory, layout.shard_id)
    removed = (
        update_log.remove_torn_segments(folder, None if pointer is None else pointer["log"]) if folder.is_dir() else []
    )
    for line in removed:
        log.warning("shard %d: %s", layout.shard_id, line)
    shard, recovery = _recover_from(layout, directory, folder, seed, fallback, pointer)
    recovery.notes.extend(removed)
    return shard, recovery


@dataclass
class Walk:
    """What a shard's folder says the shard is: the base (snapshot `tag`, or the seeded
    rows of `seed` when `tag` is None), then the update log from record `start` of
    `segment` on (None: no log), following each segment's successor in `following`."""

    tag: str | None
    seed: int | None
    segment: int | None
    start: int = 0
    following: dict[int, int] = field(default_factory=dict)
    from_log_alone: bool = False  # no LATEST: the pointer was read off the log's oldest segment

    def segments(self) -> list[int]:
        return [] if self.segment is None else update_log.chain(self.segment, self.following)


@dataclass
class Replayed:
    """What `replay` applied: the segments, the records, and the segment ending in a
    torn last record with its scan (None if none)."""

    segments: list[int]
    records: int = 0
    torn: tuple[Path, update_log.Scan] | None = None


def find_walk(
    layout: Layout, directory, seed: int | None, pointer: dict | None, skip: Collection[int] = ()
) -> Walk | None:
    """The walk of shard `layout.shard_id`'s folder, whose LATEST says `pointer`, passing
    over the log segments in `skip` (see ``update_log.torn_segments``); None when the
    folder holds neither LATEST nor a log (a fresh bank). Reads only. DataLoss naming
    the file when the folder cannot say; `seed` is assumed for a log alone that does not
    record its own (None: DataLoss)."""
    folder = snapshots.shard_dir(directory, layout.shard_id)
    from_log_alone = pointer is None
    if from_log_alone:
        pointer = _pointer_from_log(layout, folder, seed, skip)
        if pointer is None:
            return None
    following = update_log.successors(folder, skip)
    if pointer["log"] is not None and not update_log.segment_path(folder, pointer["log"]).exists():
        raise DataLoss(
            f"{snapshots.latest_path(directory, layout.shard_id)} continues with log segment "
            f"{update_log.segment_path(folder, pointer['log'])}, which is missing"
        )
    return Walk(pointer["tag"], pointer["seed"], pointer["log"], pointer["from"], following, from_log_alone)


def replay(layout: Layout, directory, walk: Walk, apply: Callable[[update_log.Record], None]) -> Replayed:
    """Call `apply` on every log record `walk` replays after its base, in order, each
    segment checked against `layout`. A torn last record of the last segment is passed
    over and reported, not cut off: nothing on disk changes. LogCorrupt or DataLoss
    naming the file for anything else."""
    folder = snapshots.shard_dir(directory, layout.shard_id)
    replayed = Replayed(walk.segments())
    for i, number in enumerate(replayed.segments):
        path = update_log.segment_path(folder, number)
        update_log.check_layout(path, layout)
        first = walk.start if i == 0 else 0
        scan = update_log.read_records(
            path,
            layout.dim,
            DTYPES[layout.dtype],
            apply,
            start=first,
            allow_torn_tail=i == len(replayed.segments) - 1,
        )
        if scan.records < first:
            raise update_log.LogCorrupt(
                f"log segment {path} holds {scan.records} good records; "
                f"{snapshots.latest_path(directory, layout.shard_id)} continues from record {first}"
            )
        replayed.records += scan.records - first
        if scan.torn_bytes:
            replayed.torn = (path, scan)
    return replayed


def _recover_from(
    layout, directory, folder: Path, seed: int, fallback: bool, pointer: dict | None
) -> tuple[Shard, Recovery]:
    walk = find_walk(layout, directory, seed, pointer)
    if walk is None:
        found = snapshots.snapshots_newest_first(directory, layout.shard_id)
        if not found:
            return Shard.create(layout, seed), _fresh(seed, "no LATEST: a fresh bank")
        note = (
            f"no LATEST and no update log in {folder}, but snapshot(s) {', '.join(p.name for p in found)}: "
            f"starting from the seeded rows (seed {seed}), not from any of them; Restore one by tag to "
            "use it"
        )
        log.warning("shard %d: %s", layout.shard_id, note)
        return Shard.create(layout, seed), _fresh(seed, note)
    notes = []
    started = time.perf_counter()
    if walk.tag is None:
        base_seed = walk.seed
        if base_seed != seed:
            notes.append(f"the log continues the rows of seed {base_seed}, not --seed {seed}: used seed {base_seed}")
        shard = Shard(layout, initial_rows(layout, base_seed), seed=seed)
        recovery = Recovery(source=f"initial rows (seed {base_seed})", seed=base_seed, notes=notes)
        if walk.from_log_alone or walk.segment is None:  # LATEST must name the timeline from now on
            recovery.new_pointer = {"tag": None, "seed": base_seed, "segment": walk.segment, "from": 0}
        if walk.from_log_alone:
            note = (
                f"no LATEST in {folder}: recovered from its update log alone (segment {walk.segment} on, "
                "which starts from the seeded rows)"
            )
            log.warning("shard %d: %s", layout.shard_id, note)
            notes.append(note)
    else:
        try:
            shard = Shard.restore(layout, directory, walk.tag, seed=seed)
            recovery = Recovery(source=f"snapshot {walk.tag}", tag=walk.tag)
            if walk.segment is None:  # a snapshot from before the log: LATEST must name the log from now on
                recovery.new_pointer = {"tag": walk.tag, "seed": None, "segment": None, "from": 0}
        except (DataLoss, NotFound) as error:
            if not fallback:
                raise
            shard, recovery, start = _fall_back(layout, directory, folder, seed, walk, error)
            walk = replace(walk, segment=start[0], start=start[1])
    recovery.base_seconds = time.perf_counter() - started
    started = time.perf_counter()
    replayed = replay(layout, directory, walk, shard.apply_logged)
    if replayed.segments:
        recovery.segments = replayed.segments
        recovery.records_replayed = replayed.records
        if replayed.torn is not None:
            path, scan = replayed.torn
            _cut_torn_tail(path, scan.good_end)
            recovery.torn_bytes_dropped = scan.torn_bytes
            recovery.notes.append(
                f"a torn last record ({scan.torn_bytes} bytes) cut off {path}: its update was never acknowledged"
            )
        recovery.last_segment = replayed.segments[-1]
    recovery.replay_seconds = time.perf_counter() - started
    return shard, recovery


def _pointer_from_log(layout: Layout, folder: Path, seed: int | None, skip: Collection[int] = ()) -> dict | None:
    """For a folder without LATEST: None if it holds no log (a fresh bank); the pointer
    LATEST would hold if the log starts from the seeded rows and is one timeline; else
    DataLoss naming the folder and what is missing."""
    numbers = [n for n in update_log.segment_numbers(folder) if n not in skip]
    if not numbers:
        return None
    first = update_log.segment_path(folder, numbers[0])
    header = update_log.read_header(first)
    held = f"{folder} holds update-log segment(s) {', '.join(map(str, numbers))} but no LATEST"
    if header.get("previous") is not None:
        raise DataLoss(
            f"{held}, and its oldest, {first.name}, continues segment {header['previous']}, which is "
            "missing: the rows before it cannot be rebuilt (LATEST named the snapshot they start from)"
        )
    if header.get("base") is not None:
        raise DataLoss(
            f"{held}, and its oldest, {first.name}, starts from snapshot {header['base']!r} (a Restore), "
            "not from the seeded rows: LATEST, which said so, is missing"
        )
    try:
        update_log.check_layout(first, layout, header)
    except DataLoss as error:
        raise DataLoss(f"{held}, and {error}") from None
    others = sorted(set(numbers) - set(update_log.chain(numbers[0], update_log.successors(folder, skip))))
    if others:
        raise DataLoss(
            f"{held}, and segment(s) {', '.join(map(str, others))} do not continue the seeded timeline "
            f"of {first.name} (a Restore's): without LATEST it cannot tell which timeline is current"
        )
    logged_seed = header.get("seed")
    if logged_seed is None and seed is None:
        raise DataLoss(f"{held}, and its oldest, {first.name}, does not record the seed of the rows it starts from")
    if logged_seed is None:  # written before segments recorded their seed
        log.warning("shard %d: %s does not record its seed; assuming --seed %d", layout.shard_id, first, seed)
        logged_seed = seed
    return {"tag": None, "log": numbers[0], "from": 0, "seed": logged_seed}


def _fall_back(layout, directory, folder, seed, walk: Walk, error):
    """The newest good snapshot whose log timeline reaches LATEST's segment."""
    bad = snapshots.snapshot_path(directory, layout.shard_id, walk.tag)
    for path in snapshots.snapshots_newest_first(directory, layout.shard_id):
        if path == bad:
            continue
        try:
            metadata = snapshots.read_metadata(path)
            segment = metadata.get("log_segment")
            if not segment or walk.segment not in update_log.chain(segment, walk.following):
                continue
            shard = Shard.restore(layout, directory, path.stem, seed=seed)
        except (DataLoss, NotFound) as other:
            log.warning("shard %d: fallback candidate %s is no good either: %s", layout.shard_id, path, other)
            continue
        note = f"fell back to snapshot {path.stem} as --fallback-snapshot asks, because {error}"
        log.warning("shard %d: %s", layout.shard_id, note)
        recovery = Recovery(source=f"snapshot {path.stem} (fallback)", tag=path.stem, notes=[note])
        position = shard.restored_log_position
        recovery.new_pointer = {"tag": path.stem, "seed": None, "segment": position[0], "from": position[1]}
        return shard, recovery, position
    raise DataLoss(
        f"{error}; and no other good snapshot in {folder} is continued by the log up to "
        f"segment {walk.segment} (--fallback-snapshot)"
    ) from error


def _remove_stale_temporaries(folder: Path) -> None:
    """Half-written snapshot and LATEST files of a writer that died (a snapshot killed
    mid-write): never renamed, so nothing names them."""
    for path in folder.glob(".*.tmp-*") if folder.is_dir() else ():
        log.info("removing %s, left by a snapshot that did not finish", path)
        path.unlink(missing_ok=True)


def _cut_torn_tail(path: Path, good_end: int) -> None:
    """Drop a torn last record for good, so the segment reads whole next time (the log
    goes on in a new segment, and a torn record is only allowed in the newest)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, good_end)
        os.fsync(fd)
    finally:
        os.close(fd)
