"""What one bank of `instdisc scale bank` costs, measured on its running shard
servers: `Step` from concurrent clients, `Sample`/`Lookup`/`Update` alone,
`PartitionSum`/`TopK` scans, snapshot and restore speed against the disk's, start-up
time and memory per row."""

from __future__ import annotations

import os
import re
import shutil
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from bank_server.client import BankClient
from benchmarks.bank_grid import GB, Bank, BankPoint
from benchmarks.processes import start_bank_processes
from benchmarks.step_client import run_step_clients, warmup_calls
from benchmarks.timing import timed_calls
from benchmarks.workload import MOMENTUM, StepWorkload, step_message_bytes

_TEMPERATURE = 0.07
_KNN_K = 200          # the kNN evaluation's k
_SCAN_CALLS, _SCAN_BUDGET_S = 3, 2.0
_RPC_TIMEOUT_S = 900  # a PartitionSum over 3e7 rows on one core takes about a minute
_SNAPSHOT_TAG = "scale"


class Servers:
    """The S shard processes of one bank, started together; killed with `stack`."""

    def __init__(self, bank: Bank, snapshot_dir: Path, stack: ExitStack):
        start = time.perf_counter()
        self.procs = start_bank_processes(stack, bank.shards, bank.rows, bank.dim, bank.dtype,
                                          snapshot_dir=snapshot_dir, log_dir=snapshot_dir)
        self.startup_s = time.perf_counter() - start
        self.addresses = [p.address for p in self.procs]

    def rss_bytes(self) -> int:
        return sum(_rss_bytes(p.proc.pid) for p in self.procs)


def _rss_bytes(pid: int) -> int:
    found = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.MULTILINE)
    return int(found.group(1)) * 1024


def idle_server_rss(directory: Path) -> int:
    """RSS of a shard process holding one row: what every shard costs before its rows."""
    with ExitStack() as stack:
        return Servers(Bank(1, 1, 1, "float32"), directory, stack).rss_bytes()


def measure_bank(bank: Bank, points: list[BankPoint], batch: int, iters: int, idle_rss: int, workdir: Path,
                 progress) -> list[dict]:
    """Start the bank's servers once and measure every point on them, then the
    per-bank numbers. RSS is read right after start-up, before any call leaves
    message buffers or scan temporaries behind; the snapshot comes last because its
    Restore replaces the rows."""
    snapshot_dir = workdir / f"bank-{bank.rows}-{bank.shards}-{bank.dtype}"
    snapshot_dir.mkdir()
    try:
        with ExitStack() as stack:
            servers = Servers(bank, snapshot_dir, stack)
            rss = servers.rss_bytes()
            client = stack.enter_context(BankClient(servers.addresses, timeout=_RPC_TIMEOUT_S))
            per_bank = {"startup_s": servers.startup_s, "rss_bytes": rss,
                        "bytes_per_row": (rss - bank.shards * idle_rss) / bank.rows,
                        "raw_bytes_per_row": bank.row_bytes}
            results = []
            for point in points:
                progress.set_description(str(point))
                row = {"rows": bank.rows, "shards": bank.shards, "negatives": point.negatives, "dtype": bank.dtype,
                       "clients": point.clients, "dim": bank.dim, "batch": batch, "iters": iters}
                load = run_step_clients(servers.addresses, bank.rows, bank.dim, batch, point.negatives,
                                        point.clients, iters, _RPC_TIMEOUT_S)
                row.update({key: load[key] for key in ("step_p50_ms", "step_p99_ms", "steps_per_s", "rows_per_s")})
                row.update(measure_calls(client, point, batch, iters))
                sizes = step_message_bytes(batch, point.negatives, bank.dim, bank.dtype, bank.shards)
                # Other work on the machine shows up as latency: the load says when it did.
                row.update(step_request_bytes=sum(s[0] for s in sizes), step_answer_bytes=sum(s[1] for s in sizes),
                           load_1m=os.getloadavg()[0])
                results.append(row)
                progress.update()
            progress.set_description(f"{bank}: scans, snapshot")
            per_bank.update(measure_scans(client, bank, batch))
            per_bank.update(measure_snapshot(client, bank, snapshot_dir))
    finally:
        shutil.rmtree(snapshot_dir, ignore_errors=True)
    return [{**row, **per_bank} for row in results]


def _p50_ms(seconds: list[float]) -> float:
    return float(np.median(seconds)) * 1e3


def measure_calls(client: BankClient, point: BankPoint, batch: int, iters: int) -> dict:
    """`Sample` of K, `Lookup` and `Update` of B rows, each alone (one client)."""
    work = StepWorkload(point.bank.rows, point.bank.dim, batch, seed=100)
    warmup = warmup_calls(iters)
    return {
        "sample_p50_ms": _p50_ms(timed_calls(lambda i: client.sample(point.negatives), iters, warmup)),
        "lookup_p50_ms": _p50_ms(timed_calls(lambda i: client.lookup(work.indices(i)), iters, warmup)),
        "update_p50_ms": _p50_ms(timed_calls(lambda i: client.update(work.indices(i), work.features(i), MOMENTUM),
                                             iters, warmup)),
    }


def _scan_ms(fn) -> float:
    """Median of a few calls, as many as fit in a small budget but at least one: a
    scan of 3e7 rows takes a minute, one of 1e4 a millisecond."""
    seconds, begin = [], time.perf_counter()
    while len(seconds) < _SCAN_CALLS and (not seconds or time.perf_counter() - begin < _SCAN_BUDGET_S):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return _p50_ms(seconds)


def measure_scans(client: BankClient, bank: Bank, batch: int) -> dict:
    """`PartitionSum` (the exact softmax's per-step call) and `TopK` (kNN evaluation)
    for one batch of B queries: both read every row of the bank."""
    queries = StepWorkload(bank.rows, bank.dim, batch, seed=200).features(0)
    k = min(_KNN_K, bank.rows)
    return {"partition_sum_ms": _scan_ms(lambda: client.partition_sums(queries, _TEMPERATURE)),
            "topk_ms": _scan_ms(lambda: client.topk(queries, k))}


def measure_snapshot(client: BankClient, bank: Bank, directory: Path) -> dict:
    """Snapshot write and Restore speed of the whole bank (shards in parallel), and
    the disk's: the faster of two plain writes of as many bytes to the same disk, one
    just before the snapshot and one just after. This machine's disk speed varies
    several-fold from minute to minute, so only a yardstick taken alongside is fair,
    and the faster of two keeps a slow moment from flattering the snapshot. The
    snapshot files are dropped from the page cache before the restore, which then
    reads the disk as a restarted shard would."""
    disk_before = disk_write_gbps(directory, bank.raw_bytes)
    start = time.perf_counter()
    written = client.snapshot(_SNAPSHOT_TAG)
    write_s = time.perf_counter() - start
    disk_gbps = max(disk_before, disk_write_gbps(directory, bank.raw_bytes))
    for shard in written:
        _drop_from_page_cache(shard["path"])
    start = time.perf_counter()
    client.restore(_SNAPSHOT_TAG)
    restore_s = time.perf_counter() - start
    nbytes = sum(shard["bytes"] for shard in written)
    return {"snapshot_bytes": nbytes, "snapshot_write_gbps": nbytes / GB / write_s,
            "disk_write_gbps": disk_gbps, "restore_gbps": nbytes / GB / restore_s}


def _drop_from_page_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def disk_write_gbps(directory: Path, nbytes: int) -> float:
    """Sequential write speed of `directory`'s disk: `nbytes` of random data in writes
    of up to 64 MiB, then fsync, as a snapshot writes."""
    block = memoryview(np.random.default_rng(0).bytes(min(nbytes, 64 << 20)))
    path = directory / "disk-test.bin"
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for begin in range(0, nbytes, len(block)):
            os.write(fd, block[:nbytes - begin])
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - start
    path.unlink()
    return nbytes / GB / seconds
