"""`instdisc scale bank`: what the memory bank costs as it grows, on real shard servers.

Each point of the sweep is a bank of N rows on S shard processes (loopback gRPC, one
BLAS thread each, as `instdisc bench bank` runs them) with K negatives per `Step`,
rows stored in one dtype, and C client processes calling `Step` in a loop together.
A full cartesian grid would take hours, so each axis is swept alone around a base
point (the lower median of the rows, shards and negatives lists, the first dtype,
the fewest clients): N x S, then K, dtype and C at the base. Points that share
(N, S, dtype) share one set of servers, which also gives the per-bank numbers:
start-up time, memory per row, `PartitionSum`/`TopK` time and snapshot write and
restore speed.

A bank that would not fit in memory is refused before anything starts: this
machine has no swap, so the alternative is the OOM killer, not a slow point.

Outputs in ``--output-dir``: ``results.parquet`` (one row per point), ``results.md``
(the table, the target checks and the capacity model) and PNG plots.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bank_server import tensors
from bank_server.bench import timed_calls
from bank_server.client import BankClient
from bank_server.report import plot_lines, write_table
from protos import bank_pb2

GIB = 1 << 30
GB = 1e9  # throughputs and the capacity model count in decimal GB, as disks and budgets do
ITEMSIZE = {"float16": 2, "float32": 4}

DEFAULTS = {"rows": "1e4,1e5,1e6,1e7,3e7,1e8", "shards": "1,2,4", "negatives": "256,1024,4096,16384,65536",
            "dtypes": "float16,float32", "clients": "1,2,4", "iters": 300}
QUICK = {"rows": "1e4,1e5,1e6", "shards": "1,2", "negatives": "4096,16384", "dtypes": "float16,float32",
         "clients": "1,2", "iters": 50}

# Memory a bank needs beyond its rows. A shard process idles at about 100 MiB (Python,
# gRPC, numpy, pyarrow); its message buffers and scan temporaries come on top.
_PROCESS_OVERHEAD = 256 << 20
# Restore loads the snapshot beside the live rows before swapping them in.
_RESTORE_COPIES = 2
# Below this many bytes of rows a bank's RSS is mostly allocator noise (tens of MB of
# start-up temporaries the heap keeps), so the capacity model uses the raw bytes.
_MIN_MEASURED_BYTES = 100_000_000
# Kept free of the machine's MemAvailable: the page cache and everything else need room.
_MARGIN_FRACTION, _MIN_MARGIN = 0.1, 1 * GIB

_MOMENTUM = 0.5
_TEMPERATURE = 0.07
_KNN_K = 200          # the kNN evaluation's k
_SCAN_CALLS, _SCAN_BUDGET_S = 3, 2.0
_RPC_TIMEOUT_S = 900  # a PartitionSum over 3e7 rows on one core takes about a minute
_SNAPSHOT_TAG = "scale"
# One BLAS thread per process, as the Ray actors run: spinning BLAS threads from several
# processes on a few cores would measure oversubscription, not the bank.
_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

TABLE_COLUMNS = ("rows", "shards", "negatives", "dtype", "clients", "step_p50_ms", "step_p99_ms", "rows_per_s",
                 "sample_p50_ms", "lookup_p50_ms", "update_p50_ms", "partition_sum_ms", "topk_ms", "startup_s",
                 "bytes_per_row", "raw_bytes_per_row", "snapshot_write_gbps", "disk_write_gbps", "restore_gbps")


def add_scale_bank_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", help=f"comma-separated bank sizes N (default {DEFAULTS['rows']})")
    parser.add_argument("--shards", help=f"comma-separated shard counts S (default {DEFAULTS['shards']})")
    parser.add_argument("--negatives", help=f"comma-separated negatives K per Step (default {DEFAULTS['negatives']})")
    parser.add_argument("--dtypes", help=f"comma-separated row dtypes (default {DEFAULTS['dtypes']})")
    parser.add_argument("--clients", help=f"comma-separated concurrent Step clients (default {DEFAULTS['clients']})")
    parser.add_argument("--iters", type=int, help=f"timed calls per point and client (default {DEFAULTS['iters']}, "
                                                  f"--quick {QUICK['iters']})")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--batch", type=int, default=256, help="B: rows updated and looked up per Step; "
                                                               "also the queries per PartitionSum/TopK")
    parser.add_argument("--shard-memory-gb", type=float, default=64.0,
                        help="per-shard memory budget of the capacity model (GB)")
    parser.add_argument("--output-dir", default="runs/scale-bank")
    parser.add_argument("--quick", action="store_true",
                        help=f"a small grid for CI: rows {QUICK['rows']}, shards {QUICK['shards']}, ...")


# -- the grid -------------------------------------------------------------------

@dataclass(frozen=True)
class Bank:
    """One set of shard servers; every point on it reuses them."""
    rows: int
    shards: int
    dim: int
    dtype: str

    @property
    def row_bytes(self) -> int:
        return self.dim * ITEMSIZE[self.dtype]

    @property
    def raw_bytes(self) -> int:
        return self.rows * self.row_bytes

    def __str__(self) -> str:
        return f"N={format_rows(self.rows)} S={self.shards} {self.dtype}"


@dataclass(frozen=True)
class Point:
    bank: Bank
    negatives: int
    clients: int

    def __str__(self) -> str:
        return f"{self.bank} K={self.negatives} C={self.clients}"


def format_rows(n: int) -> str:
    """1e4, 3e7, 123,456: the short form when N is a digit times a power of ten."""
    exponent = int(math.log10(n)) if n > 0 else 0
    mantissa, remainder = divmod(n, 10 ** exponent)
    return f"{mantissa}e{exponent}" if remainder == 0 and mantissa < 10 and exponent >= 3 else f"{n:,}"


def _lower_median(values: list[int]) -> int:
    return sorted(values)[(len(values) - 1) // 2]


def plan_grid(rows: list[int], shards: list[int], negatives: list[int], dtypes: list[str], clients: list[int],
              dim: int) -> tuple[list[Point], Point]:
    """The points of the one-axis-at-a-time sweep, grouped by bank, and the base point."""
    base = Point(Bank(_lower_median(rows), _lower_median(shards), dim, dtypes[0]), _lower_median(negatives),
                 min(clients))
    points = [Point(Bank(n, s, dim, base.bank.dtype), base.negatives, base.clients) for n in rows for s in shards]
    points += [Point(base.bank, k, base.clients) for k in negatives]
    points += [Point(Bank(base.bank.rows, base.bank.shards, dim, d), base.negatives, base.clients) for d in dtypes]
    points += [Point(base.bank, base.negatives, c) for c in clients]
    unique = list(dict.fromkeys(points))
    unique.sort(key=lambda p: (p.bank.raw_bytes, p.bank.shards, p.bank.dtype, p.negatives, p.clients))
    return unique, base


def _parse_list(text: str, name: str, kind) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--{name} {text!r}: not a comma-separated list") from None
    if not values:
        raise ValueError(f"--{name} is empty")
    return list(dict.fromkeys(values))


def _positive_int(text: str) -> int:
    value = float(text)
    if value != int(value) or value < 1:
        raise ValueError(text)
    return int(value)


def _dtype(text: str) -> str:
    text = text.strip()
    if text not in ITEMSIZE:
        raise ValueError(text)
    return text


# -- memory ---------------------------------------------------------------------

def memory_available() -> int:
    """MemAvailable from /proc/meminfo, in bytes."""
    found = re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
    return int(found.group(1)) * 1024


def memory_need(bank: Bank, clients: int) -> int:
    """Bytes the bank's servers and the point's clients may hold at once (the peak is
    a Restore, which holds two copies of the rows)."""
    return _RESTORE_COPIES * bank.raw_bytes + (bank.shards + clients + 1) * _PROCESS_OVERHEAD


def refusal(bank: Bank, clients: int, available: int, disk_free: int) -> str | None:
    """Why `bank` cannot run here (memory, or disk for its snapshot), or None."""
    usable = available - max(_MIN_MARGIN, int(_MARGIN_FRACTION * available))
    need = memory_need(bank, clients)
    if need > usable:
        return (f"skipping {bank}: needs {need / GIB:.1f} GiB, {usable / GIB:.1f} GiB available "
                f"(MemAvailable {available / GIB:.1f} GiB less a safety margin)")
    if bank.raw_bytes > disk_free:  # each disk test's file is deleted before the next write
        return (f"skipping {bank}: its snapshot needs {bank.raw_bytes / GIB:.1f} GiB of disk, "
                f"{disk_free / GIB:.1f} GiB free")
    return None


def _rss_bytes(pid: int) -> int:
    found = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.MULTILINE)
    return int(found.group(1)) * 1024


# -- processes ------------------------------------------------------------------

class Servers:
    """The S `python -m bank_server` processes of one bank, started together."""

    def __init__(self, bank: Bank, snapshot_dir: Path, stack: ExitStack):
        start = time.perf_counter()
        self.procs = [self._spawn(bank, s, snapshot_dir, stack) for s in range(bank.shards)]
        self.addresses = [self._wait_serving(proc, snapshot_dir, s) for s, proc in enumerate(self.procs)]
        self.startup_s = time.perf_counter() - start

    @staticmethod
    def _spawn(bank: Bank, shard: int, snapshot_dir: Path, stack: ExitStack) -> subprocess.Popen:
        log = stack.enter_context(open(snapshot_dir / f"server-{shard}.log", "w"))
        proc = subprocess.Popen(
            [sys.executable, "-m", "bank_server", "--shard-id", str(shard), "--num-shards", str(bank.shards),
             "--rows", str(bank.rows), "--dim", str(bank.dim), "--dtype", bank.dtype, "--port", "0",
             "--snapshot-dir", str(snapshot_dir)],
            stdout=subprocess.PIPE, stderr=log, text=True, env=_ENV)

        def kill():
            # SIGKILL, not SIGTERM: on SIGTERM a server writes a final snapshot of its
            # whole bank, which would cost seconds per GB and measure nothing.
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait()
            proc.stdout.close()

        stack.callback(kill)
        return proc

    @staticmethod
    def _wait_serving(proc: subprocess.Popen, snapshot_dir: Path, shard: int) -> str:
        address = None
        for line in proc.stdout:
            found = re.search(r"listening on (\S+)", line)
            if found:
                address = found.group(1)
            elif "SERVING" in line and address:
                return address
        log = (snapshot_dir / f"server-{shard}.log").read_text()[-2000:]
        raise RuntimeError(f"bank shard {shard} exited with {proc.wait()} before serving:\n{log}")

    def rss_bytes(self) -> int:
        return sum(_rss_bytes(p.pid) for p in self.procs)


class Batches:
    """A cycle of batches of distinct row indices and unit features, drawn up front so
    the timed loops only call the bank."""

    def __init__(self, rows: int, dim: int, batch: int, seed: int, count: int = 64):
        rng = np.random.default_rng(seed)
        self._indices = [rng.choice(rows, batch, replace=False) for _ in range(count)]
        f = rng.standard_normal((count, batch, dim), dtype=np.float32)
        self._features = f / np.linalg.norm(f, axis=2, keepdims=True)

    def indices(self, i: int) -> np.ndarray:
        return self._indices[i % len(self._indices)]

    def features(self, i: int) -> np.ndarray:
        return self._features[i % len(self._features)]


def _warmup(iters: int) -> int:
    return max(3, iters // 10)


def client_main() -> None:
    """One Step client of a point, in its own process (threads would share one GIL and
    flatten the throughput-vs-clients curve). Spec as JSON in argv[1]; prints 'ready'
    after its warm-up, starts timing when a line arrives on stdin, and prints its
    latencies and its monotonic start and end as one JSON line."""
    spec = json.loads(sys.argv[1])
    work = Batches(spec["rows"], spec["dim"], spec["batch"], seed=spec["seed"])
    with BankClient(spec["addresses"], timeout=_RPC_TIMEOUT_S) as client:
        def step(i):
            client.step(work.indices(i), work.features(i), _MOMENTUM, work.indices(i + 1), spec["negatives"])

        for i in range(_warmup(spec["iters"])):
            step(i)
        print("ready", flush=True)
        sys.stdin.readline()
        start = time.monotonic()
        latencies = timed_calls(step, spec["iters"], 0)
        end = time.monotonic()
    print(json.dumps({"latencies": latencies, "start": start, "end": end}), flush=True)


def run_step_clients(addresses: list[str], point: Point, batch: int, iters: int) -> dict:
    """Step latency over all clients' calls and the aggregate rows/s of C clients that
    start together."""
    with ExitStack() as stack:
        procs = []
        for c in range(point.clients):
            spec = {"addresses": addresses, "rows": point.bank.rows, "dim": point.bank.dim, "batch": batch,
                    "negatives": point.negatives, "iters": iters, "seed": c}
            proc = subprocess.Popen(
                [sys.executable, "-c", "from bank_server.scale import client_main; client_main()", json.dumps(spec)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_ENV)
            stack.callback(_reap, proc)
            procs.append(proc)
        for proc in procs:
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError(f"a Step client of {point} exited with {proc.wait()} before its warm-up ended")
        for proc in procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        answers = [json.loads(proc.stdout.readline()) for proc in procs]
    latencies_ms = np.concatenate([a["latencies"] for a in answers]) * 1e3
    wall = max(a["end"] for a in answers) - min(a["start"] for a in answers)
    steps = point.clients * iters
    return {"step_p50_ms": float(np.percentile(latencies_ms, 50)),
            "step_p99_ms": float(np.percentile(latencies_ms, 99)),
            "steps_per_s": steps / wall, "rows_per_s": steps * (2 * batch + point.negatives) / wall}


def _reap(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    proc.stdin.close()
    proc.stdout.close()


# -- measurements on one bank -------------------------------------------------------

def _p50_ms(seconds: list[float]) -> float:
    return float(np.median(seconds)) * 1e3


def measure_calls(client: BankClient, point: Point, batch: int, iters: int) -> dict:
    """`Sample` of K, `Lookup` and `Update` of B rows, each alone (one client)."""
    work = Batches(point.bank.rows, point.bank.dim, batch, seed=100)
    warmup = _warmup(iters)
    return {
        "sample_p50_ms": _p50_ms(timed_calls(lambda i: client.sample(point.negatives), iters, warmup)),
        "lookup_p50_ms": _p50_ms(timed_calls(lambda i: client.lookup(work.indices(i)), iters, warmup)),
        "update_p50_ms": _p50_ms(timed_calls(lambda i: client.update(work.indices(i), work.features(i), _MOMENTUM),
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
    queries = Batches(bank.rows, bank.dim, batch, seed=200).features(0)
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


def idle_server_rss(directory: Path) -> int:
    """RSS of a shard process holding one row: what every shard costs before its rows."""
    with ExitStack() as stack:
        return Servers(Bank(1, 1, 1, "float32"), directory, stack).rss_bytes()


def step_message_bytes(batch: int, negatives: int, dim: int, dtype: str, shards: int) -> tuple[int, int]:
    """(request, answer) bytes of one Step over all shards, as protobuf encodes them
    (float32 features in; rows in the bank's dtype out), shares split evenly."""
    request_bytes = answer_bytes = 0
    for s in range(shards):
        b, k = len(range(s, batch, shards)), len(range(s, negatives, shards))
        request = bank_pb2.StepRequest(
            update=bank_pb2.UpdateRequest(indices=tensors.encode(np.zeros(b, np.int64)),
                                          features=tensors.encode(np.zeros((b, dim), np.float32)),
                                          momentum=_MOMENTUM, client_id="0" * 32, sequence=1 << 20),
            lookup_indices=tensors.encode(np.zeros(b, np.int64)), sample_k=k)
        answer = bank_pb2.StepResponse(
            update_applied=True, rows=tensors.encode(np.zeros((b, dim), dtype)),
            sample_indices=tensors.encode(np.zeros(k, np.int64)),
            sample_rows=tensors.encode(np.zeros((k, dim), dtype)))
        request_bytes += request.ByteSize()
        answer_bytes += answer.ByteSize()
    return request_bytes, answer_bytes


def measure_bank(bank: Bank, points: list[Point], batch: int, iters: int, idle_rss: int, workdir: Path,
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
                row.update(run_step_clients(servers.addresses, point, batch, iters))
                row.update(measure_calls(client, point, batch, iters))
                request, answer = step_message_bytes(batch, point.negatives, bank.dim, bank.dtype, bank.shards)
                # Other work on the machine shows up as latency: the load says when it did.
                row.update(step_request_bytes=request, step_answer_bytes=answer, load_1m=os.getloadavg()[0])
                results.append(row)
                progress.update()
            progress.set_description(f"{bank}: scans, snapshot")
            per_bank.update(measure_scans(client, bank, batch))
            per_bank.update(measure_snapshot(client, bank, snapshot_dir))
    finally:
        shutil.rmtree(snapshot_dir, ignore_errors=True)
    return [{**row, **per_bank} for row in results]


# -- what the numbers say -------------------------------------------------------------

def _largest(rows: list[dict], **match) -> dict | None:
    """The row with the largest N (then the fewest shards) among those matching."""
    found = [r for r in rows if all(r[k] == v for k, v in match.items())]
    return max(found, key=lambda r: (r["rows"], -r["shards"]), default=None)


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def target_checks(results: list[dict], base: Point) -> list[str]:
    """The three targets, each with its measured numbers and PASS/FAIL."""
    lines = []
    for shards in sorted({r["shards"] for r in results}):
        sweep = sorted((r for r in results if r["shards"] == shards and r["negatives"] == base.negatives
                        and r["dtype"] == base.bank.dtype and r["clients"] == base.clients), key=lambda r: r["rows"])
        if len(sweep) < 2:
            continue
        small, large = sweep[0], sweep[-1]
        ratio = large["step_p50_ms"] / small["step_p50_ms"]
        lines.append(f"- Step latency flat in N (S={shards}, K={base.negatives}, {base.bank.dtype}): p50 "
                     f"{small['step_p50_ms']:.2f} ms at N={format_rows(small['rows'])}, {large['step_p50_ms']:.2f} ms "
                     f"at N={format_rows(large['rows'])}: ratio {ratio:.2f} (target <= 1.2) {_verdict(ratio <= 1.2)}")
    fp16 = _largest(results, dtype="float16")
    if fp16:
        ratio = fp16["bytes_per_row"] / fp16["raw_bytes_per_row"]
        lines.append(f"- float16 memory per row (N={format_rows(fp16['rows'])}, S={fp16['shards']}): "
                     f"{fp16['bytes_per_row']:.1f} B against 2 x D = {fp16['raw_bytes_per_row']} B: ratio {ratio:.3f} "
                     f"(target <= 1.1) {_verdict(ratio <= 1.1)}")
    biggest = _largest(results)
    ratio = biggest["snapshot_write_gbps"] / biggest["disk_write_gbps"]
    lines.append(f"- Snapshot write (N={format_rows(biggest['rows'])}, S={biggest['shards']}, {biggest['dtype']}, "
                 f"{biggest['snapshot_bytes'] / GB:.2f} GB): {biggest['snapshot_write_gbps']:.2f} GB/s against "
                 f"{biggest['disk_write_gbps']:.2f} GB/s, the faster of two plain fsync'd writes of as many bytes "
                 f"beside it: ratio {ratio:.2f} (target >= 0.5) {_verdict(ratio >= 0.5)}; restore read "
                 f"{biggest['restore_gbps']:.2f} GB/s")
    return lines


def capacity_model(results: list[dict], base: Point, batch: int, idle_rss: int, shard_memory_gb: float,
                   target_rows: int = 10**9) -> list[str]:
    """Rows per GB per shard, bytes on the wire per Step, and the shards a bank of
    `target_rows` needs within a per-shard memory budget."""
    budget = shard_memory_gb * GB - idle_rss
    lines = [(f"Per-shard memory budget {shard_memory_gb:g} GB, of which {idle_rss / 1e6:.0f} MB is the idle "
              "server process. A Restore holds two copies of a shard's rows while it swaps them in."), "",
             ("| dtype | measured at | bytes/row | raw bytes/row | rows per GB per shard "
              f"| shards for {format_rows(target_rows)} rows | with Restore headroom |"),
             "|---|---|---:|---:|---:|---:|---:|"]
    for dtype in sorted({r["dtype"] for r in results}):
        row = _largest(results, dtype=dtype)
        measured = row["rows"] * row["raw_bytes_per_row"] >= _MIN_MEASURED_BYTES
        per_row = max(row["bytes_per_row"], row["raw_bytes_per_row"]) if measured else row["raw_bytes_per_row"]
        where = f"N={format_rows(row['rows'])}, S={row['shards']}" + ("" if measured else " (too small: raw used)")
        lines.append(f"| {dtype} | {where} | {row['bytes_per_row']:.1f} | {row['raw_bytes_per_row']} "
                     f"| {GB / per_row:,.0f} | {math.ceil(target_rows * per_row / budget)} "
                     f"| {math.ceil(_RESTORE_COPIES * target_rows * per_row / budget)} |")
    lines += ["", (f"Bytes on the wire per Step (B={batch}, K={base.negatives}, D={base.bank.dim}; "
                   "float32 features in, rows in the bank's dtype out):"), "",
              "| dtype | shards | request bytes | answer bytes | per step | at 1,000 steps/s |",
              "|---|---:|---:|---:|---:|---:|"]
    for dtype in sorted({r["dtype"] for r in results}):
        for shards in sorted({r["shards"] for r in results}):
            request, answer = step_message_bytes(batch, base.negatives, base.bank.dim, dtype, shards)
            lines.append(f"| {dtype} | {shards} | {request:,} | {answer:,} | {(request + answer) / 1e6:.2f} MB "
                         f"| {(request + answer) * 1000 / GB:.2f} GB/s |")
    return lines


def write_plots(output: Path, results: list[dict], base: Point) -> list[Path]:
    def at_base(r, *free):
        fixed = {"rows": base.bank.rows, "shards": base.bank.shards, "negatives": base.negatives,
                 "dtype": base.bank.dtype, "clients": base.clients}
        return all(r[k] == v for k, v in fixed.items() if k not in free)

    return [
        plot_lines(output / "latency_vs_rows.png", [r for r in results if at_base(r, "rows", "shards")],
                   "rows", "step_p50_ms", "shards", title=f"Step p50 vs bank rows (K={base.negatives}, "
                   f"{base.bank.dtype}, {base.clients} client)", xlabel="rows N", ylabel="Step p50 (ms)", logx=True),
        plot_lines(output / "throughput_vs_clients.png", [r for r in results if at_base(r, "clients")],
                   "clients", "rows_per_s", title=f"Aggregate Step throughput ({base.bank}, K={base.negatives})",
                   xlabel="concurrent clients", ylabel="rows/s (2B + K per Step)"),
        plot_lines(output / "latency_vs_negatives.png", [r for r in results if at_base(r, "negatives")],
                   "negatives", "step_p50_ms", title=f"Step p50 vs negatives ({base.bank})", xlabel="negatives K",
                   ylabel="Step p50 (ms)", logx=True),
    ]


# -- the command ----------------------------------------------------------------------

def _settings(args: argparse.Namespace) -> dict:
    """The lists and sizes of this run: explicit flags, else --quick's, else the defaults."""
    preset = QUICK if args.quick else DEFAULTS

    def pick(name):
        value = getattr(args, name, None)
        return preset[name] if value is None else value

    settings = {"rows": _parse_list(pick("rows"), "rows", _positive_int),
                "shards": _parse_list(pick("shards"), "shards", _positive_int),
                "negatives": _parse_list(pick("negatives"), "negatives", _positive_int),
                "dtypes": _parse_list(pick("dtypes"), "dtypes", _dtype),
                "clients": _parse_list(pick("clients"), "clients", _positive_int),
                "iters": pick("iters")}
    if settings["iters"] < 1 or args.dim < 1 or args.batch < 1:
        raise ValueError("--iters, --dim and --batch must be >= 1")
    return settings


def _invalid(point: Point, batch: int) -> str | None:
    bank = point.bank
    if bank.rows < max(batch, point.negatives, bank.shards):
        return f"skipping {point}: N must be at least the batch ({batch}), the negatives and the shards"
    return None


def _plan(settings: dict, batch: int, dim: int) -> tuple[dict[Bank, list[Point]], Point, list[str]]:
    """The banks to start, each with its points; the base point; and what is skipped
    and why, decided before anything starts."""
    points, base = plan_grid(settings["rows"], settings["shards"], settings["negatives"], settings["dtypes"],
                             settings["clients"], dim)
    skipped = []
    banks: dict[Bank, list[Point]] = {}
    for point in points:
        reason = _invalid(point, batch)
        if reason:
            skipped.append(reason)
        else:
            banks.setdefault(point.bank, []).append(point)
    return banks, base, skipped


def _refusal_now(bank: Bank, points: list[Point], directory: Path) -> str | None:
    return refusal(bank, max(p.clients for p in points), memory_available(), shutil.disk_usage(directory).free)


@dataclass
class Machine:
    """What the run measured about the machine it ran on, for the report."""
    idle_rss: int
    mem_available: int
    load_start: float

    def facts(self) -> str:
        return (f"{os.cpu_count()} CPUs, MemAvailable {self.mem_available / GIB:.1f} GiB at start; idle shard "
                f"process {self.idle_rss / 1e6:.0f} MB RSS; 1-minute load average {self.load_start:.2f} at start")


def run_scale_bank(args: argparse.Namespace) -> int:
    try:
        settings = _settings(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    banks, base, skipped = _plan(settings, args.batch, args.dim)
    refused = {bank: reason for bank, points in banks.items() if (reason := _refusal_now(bank, points, output))}
    skipped += refused.values()
    for line in skipped:
        print(line, flush=True)
    if len(refused) == len(banks):
        print("error: no point of this grid fits on this machine", file=sys.stderr)
        return 2
    banks = {bank: points for bank, points in banks.items() if bank not in refused}
    print(f"instdisc scale bank: {sum(map(len, banks.values()))} points on {len(banks)} banks; base {base}, "
          f"D={args.dim}, B={args.batch}, iters={settings['iters']}", flush=True)
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(dir=output, prefix=".scale-") as scratch:
        workdir = Path(scratch)
        machine = Machine(idle_server_rss(workdir), memory_available(), load_start)
        print(machine.facts(), flush=True)
        results = _sweep(banks, args.batch, settings["iters"], machine.idle_rss, workdir, skipped)
    if not results:
        print("error: every point was skipped", file=sys.stderr)
        return 2
    return _report(output, results, base, machine, skipped, args)


def _sweep(banks: dict[Bank, list[Point]], batch: int, iters: int, idle_rss: int, workdir: Path,
           skipped: list[str]) -> list[dict]:
    """Every bank in turn, under a progress bar over the points."""
    from tqdm import tqdm

    results = []
    with tqdm(total=sum(map(len, banks.values())), unit="point") as progress:
        for bank, points in banks.items():
            # Checked again just before it starts: memory the earlier banks freed, or others took.
            reason = _refusal_now(bank, points, workdir)
            if reason:
                progress.write(reason)
                skipped.append(reason)
                progress.update(len(points))
                continue
            results += measure_bank(bank, points, batch, iters, idle_rss, workdir, progress)
    return results


def _report(output: Path, results: list[dict], base: Point, machine: Machine, skipped: list[str],
            args: argparse.Namespace) -> int:
    targets = target_checks(results, base)
    capacity = capacity_model(results, base, args.batch, machine.idle_rss, args.shard_memory_gb)
    about = (f"Base point {base}; D={args.dim}, B={args.batch}. Each axis is swept alone around it. rows_per_s "
             "counts 2B + K rows per Step over all clients. partition_sum_ms and topk_ms are one call with "
             f"B={args.batch} queries. Restore reads files dropped from the page cache.")
    facts = (f"Machine: {machine.facts()}, {os.getloadavg()[0]:.2f} at end (other work on the machine shows as "
             "latency noise).")
    notes = [about, "", facts, "", "## Targets", "", *targets, "", "## Capacity model", "", *capacity, ""]
    if skipped:
        notes += ["## Skipped", "", *[f"- {line}" for line in skipped], ""]
    notes += ["## Points"]
    parquet, markdown = write_table(results, output, "instdisc scale bank", notes, TABLE_COLUMNS)
    plots = write_plots(output, results, base)
    print("\n".join(["", "Targets:", *targets, "", "Capacity model:", *capacity, ""]))
    print(f"wrote {parquet}, {markdown}, " + ", ".join(str(p) for p in plots))
    return 0
