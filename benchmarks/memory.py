"""Peak memory of a process tree by role: Ray Train workers, bank shards, the rest.

`sampled` reads, every ``interval`` seconds, the PSS (``/proc/PID/smaps_rollup``)
of every process under a root pid. PSS, not RSS: pages several processes map (the
object store, a loader's copy-on-write pages of its parent) are split between them, so
the sums add up to what the tree holds. A process has the role its nearest
ancestor-or-self's title names (``ray::RayTrainWorker``: a train worker, with its
loader processes; ``ray::BankShardActor``: a bank shard), else "other". Linux only.
"""

from __future__ import annotations

import os
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROLES = {"ray::RayTrainWorker": "train_worker", "ray::BankShardActor": "bank"}


def process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process readable now."""
    table = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_bytes()
                cmdline = Path(f"/proc/{entry.name}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:  # gone since the listing, or not ours to read
                continue
            # The command name in parentheses may itself hold spaces and parentheses.
            table[int(entry.name)] = (int(stat[stat.rindex(b")") + 2 :].split(maxsplit=2)[1]), cmdline)
    return table


def proc_bytes(path: str, field: str) -> int:
    """A ``FIELD: N kB`` line of a /proc file, in bytes (MemAvailable, VmRSS, Pss)."""
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path(path).read_text(), re.MULTILINE).group(1)) * 1024


def pss_bytes(pid: int) -> int | None:
    """Proportional set size of `pid`; None when it has gone."""
    try:
        return proc_bytes(f"/proc/{pid}/smaps_rollup", "Pss")
    except (OSError, AttributeError):  # gone, or gone mid-read
        return None


@dataclass
class Peaks:
    """The largest value each figure reached over the samples, in bytes."""

    samples: int = 0
    roles: dict[str, int] = field(default_factory=lambda: {"train_worker": 0, "bank": 0, "other": 0})
    per_worker: int = 0  # the largest train worker, with its children
    total: int = 0


def sample(root: int, peaks: Peaks) -> None:
    """Add one look at the tree under `root` to `peaks`."""
    table = process_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    roles = dict.fromkeys(peaks.roles, 0)
    workers: dict[int, int] = {}
    todo = [(root, "other", None)] if root in table else []
    while todo:  # parents before children: a child inherits its parent's role and worker
        pid, role, worker = todo.pop()
        named = next((r for prefix, r in ROLES.items() if table[pid][1].startswith(prefix)), None)
        if role == "other" and named:  # a forked loader keeps its parent's title: it is that worker's
            role, worker = named, pid if named == "train_worker" else None
        todo += [(child, role, worker) for child in children.get(pid, ())]
        if (pss := pss_bytes(pid)) is not None:
            roles[role] += pss
            if worker is not None:
                workers[worker] = workers.get(worker, 0) + pss
    peaks.samples += 1
    peaks.roles = {role: max(value, roles[role]) for role, value in peaks.roles.items()}
    peaks.per_worker = max(peaks.per_worker, *workers.values(), 0)
    peaks.total = max(peaks.total, sum(roles.values()))


@contextmanager
def sampled(root: int, interval: float = 0.25):
    """The `Peaks` of the tree under `root`, sampled every `interval` seconds on a daemon
    thread while in the ``with`` block; a failed sample raises at the block's end."""
    peaks, stop, errors = Peaks(), threading.Event(), []

    def loop() -> None:
        try:
            while not stop.wait(interval):
                sample(root, peaks)
        except Exception as error:  # raised in the caller's thread
            errors.append(error)

    thread = threading.Thread(target=loop, name=f"memory of pid {root}", daemon=True)
    thread.start()
    try:
        yield peaks
    finally:
        stop.set()
        thread.join()
    if errors:
        raise RuntimeError(f"sampling the memory of pid {root} failed") from errors[0]
