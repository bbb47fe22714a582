"""Peak memory of a process tree, by role: Ray Train workers, bank shards, the rest.

A :class:`MemorySampler` thread wakes every ``interval`` seconds, lists the processes
under a root pid (parents from ``/proc/*/stat``) and reads each one's PSS from
``/proc/PID/smaps_rollup``. PSS, not RSS: pages that several processes map (the
object store's shared memory, a DataLoader worker's copy-on-write pages of its parent)
are split between them, so the sums add up to what the tree really holds instead of
counting a shared page once per process that maps it.

Each process belongs to the role of its nearest ancestor-or-self whose command line
(Ray's process title) names one: ``ray::RayTrainWorker...`` is a train worker (with its
DataLoader workers, which are its children), ``ray::BankShardActor...`` a bank shard,
anything else (the driver, raylet, GCS, idle Ray workers, the Train controller) is
"other". A train worker's memory is its own PSS plus its descendants'; its peak is the
largest such sum over the samples.

Processes come and go between listing and reading; one that vanished is skipped for
that sample. Linux only.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

TRAIN_WORKER, BANK, OTHER = "train_worker", "bank", "other"
ROLES = {"ray::RayTrainWorker": TRAIN_WORKER, "ray::BankShardActor": BANK}


def role_of(cmdline: str) -> str | None:
    """The role a process title names, or None."""
    for prefix, role in ROLES.items():
        if cmdline.startswith(prefix):
            return role
    return None


def process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process readable now."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            with open(f"/proc/{pid}/stat", "rb") as fh:
                stat = fh.read()
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmdline = fh.read()
        except OSError:  # gone since the listing, or not ours to read
            continue
        # The command name in parentheses may itself hold spaces and parentheses.
        ppid = int(stat[stat.rindex(b")") + 2:].split(maxsplit=2)[1])
        table[pid] = (ppid, cmdline.replace(b"\0", b" ").decode(errors="replace").strip())
    return table


def descendants(root: int, table: dict[int, tuple[int, str]]) -> list[int]:
    """`root` and every process below it, parents before children."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    order, todo = [], [root] if root in table else []
    while todo:
        pid = todo.pop()
        order.append(pid)
        todo.extend(children.get(pid, ()))
    return order


def read_memory(pid: int) -> tuple[int, int] | None:
    """(PSS, PSS of anonymous and shared memory) of `pid` in bytes; None when it has gone
    (or has no mm, a kernel thread). The second leaves out mapped files (the libraries'
    code), whose share moves with how many other processes on the machine map them."""
    fields = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as fh:
            for line in fh:
                key, _, rest = line.partition(b":")
                if key in (b"Pss", b"Pss_Anon", b"Pss_Shmem"):
                    fields[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError):
        return None
    if b"Pss" not in fields:
        return None
    return fields[b"Pss"], fields.get(b"Pss_Anon", 0) + fields.get(b"Pss_Shmem", 0)


def pss_bytes(pid: int) -> int | None:
    """Proportional set size of `pid` in bytes; None when it has gone."""
    memory = read_memory(pid)
    return None if memory is None else memory[0]


@dataclass
class Sample:
    """One look at the tree: PSS per role, and per train worker (keyed by its pid) its
    PSS and its anonymous-and-shared PSS, each with its descendants'."""
    at: float
    roles: dict[str, int]
    workers: dict[int, int]
    workers_anon: dict[int, int]
    processes: int


def take_sample(root: int, table: dict[int, tuple[int, str]] | None = None,
                read: Callable[[int], tuple[int, int] | None] = read_memory) -> Sample:
    """Memory by role under `root`, from `table` (default: the processes now) and `read`."""
    table = process_table() if table is None else table
    roles = {TRAIN_WORKER: 0, BANK: 0, OTHER: 0}
    workers: dict[int, int] = {}
    workers_anon: dict[int, int] = {}
    owner: dict[int, tuple[str, int | None]] = {}  # pid -> (role, train worker pid)
    seen = 0
    for pid in descendants(root, table):
        ppid, cmdline = table[pid]
        inherited = owner.get(ppid, (OTHER, None)) if pid != root else (OTHER, None)
        named = role_of(cmdline)
        # A forked child (a DataLoader worker) keeps its parent's title: it is part of that
        # worker, not a worker of its own.
        if inherited[0] == OTHER and named is not None:
            owner[pid] = (named, pid if named == TRAIN_WORKER else None)
        else:
            owner[pid] = inherited
        memory = read(pid)
        if memory is None:
            continue
        seen += 1
        pss, anon = memory
        role, worker = owner[pid]
        roles[role] += pss
        if worker is not None:
            workers[worker] = workers.get(worker, 0) + pss
            workers_anon[worker] = workers_anon.get(worker, 0) + anon
    return Sample(time.monotonic(), roles, workers, workers_anon, seen)


@dataclass
class Peaks:
    """The largest value each figure reached over the samples, in bytes."""
    samples: int = 0
    roles: dict[str, int] = field(default_factory=lambda: {TRAIN_WORKER: 0, BANK: 0, OTHER: 0})
    total: int = 0
    workers: dict[int, int] = field(default_factory=dict)  # train worker pid -> its peak (with its children)
    workers_anon: dict[int, int] = field(default_factory=dict)  # the same without mapped files

    @property
    def per_worker(self) -> int:
        """The largest peak of any one train worker with its children (0 if none ran)."""
        return max(self.workers.values(), default=0)

    @property
    def per_worker_anon(self) -> int:
        return max(self.workers_anon.values(), default=0)

    def add(self, sample: Sample) -> None:
        self.samples += 1
        for role, value in sample.roles.items():
            self.roles[role] = max(self.roles.get(role, 0), value)
        self.total = max(self.total, sum(sample.roles.values()))
        for mine, theirs in ((self.workers, sample.workers), (self.workers_anon, sample.workers_anon)):
            for pid, value in theirs.items():
                mine[pid] = max(mine.get(pid, 0), value)

    def copy(self) -> "Peaks":
        return Peaks(self.samples, dict(self.roles), self.total, dict(self.workers), dict(self.workers_anon))


class MemorySampler:
    """Samples the tree under `root` on a daemon thread until stopped; a context manager.

        with MemorySampler(child.pid) as sampler:
            child.wait()
        sampler.peaks.per_worker, sampler.peaks.roles["bank"]
    """

    TIMELINE_COLUMNS = ("seconds", "worker_pss", "worker_anon", "train_workers", "bank", "other")

    def __init__(self, root: int, interval: float = 0.25):
        self.root, self.interval = root, interval
        self.peaks = Peaks()
        # Per sample: seconds since the start, the largest train worker's PSS and anonymous
        # PSS (each with its children), and the roles' sums; to see which phase of a run
        # holds the peak.
        self.timeline: list[tuple[float, int, int, int, int, int]] = []
        self.errors = 0
        self._started = time.monotonic()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"memory of pid {root}", daemon=True)

    def _run(self) -> None:
        while True:
            try:
                sample = take_sample(self.root)
            except Exception:  # a sample must never end the thread: the peaks so far stay valid
                self.errors += 1
            else:
                with self._lock:
                    self.peaks.add(sample)
                    self.timeline.append((sample.at - self._started, max(sample.workers.values(), default=0),
                                          max(sample.workers_anon.values(), default=0), sample.roles[TRAIN_WORKER],
                                          sample.roles[BANK], sample.roles[OTHER]))
            if self._stop.wait(self.interval):
                return

    def start(self) -> "MemorySampler":
        self._started = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> Peaks:
        self._stop.set()
        self._thread.join()
        return self.peaks

    def snapshot(self) -> Peaks:
        """A copy of the peaks so far, safe to read while sampling goes on."""
        with self._lock:
            return self.peaks.copy()

    def __enter__(self) -> "MemorySampler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def write_timeline(self, path) -> None:
        """The timeline as CSV, bytes."""
        with open(path, "w") as fh:
            fh.write(",".join(self.TIMELINE_COLUMNS) + "\n")
            for seconds, *values in self.timeline:
                fh.write(f"{seconds:.2f}," + ",".join(map(str, values)) + "\n")
