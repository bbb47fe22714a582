"""`instdisc scale bank`: what the memory bank costs as it grows, on real shard servers.

Each point is a bank of N rows on S shard processes (loopback gRPC, one BLAS thread
each), rows stored in one dtype, with C client processes making Steps together (B
updates and lookups, K negatives each). A full grid would take hours, so each axis is
swept alone around a base point: the lower median of the rows, shards and negatives,
the first dtype, the fewest clients. Points that share (N, S, dtype) share one set of
servers, which also gives the bank's start-up time and its memory per row. A bank this
machine's memory cannot hold is skipped before it starts (there is no swap to fall back
on, only the OOM killer).

With ``--bank RUN_DIR`` the bank is a finished training run's instead (`benchmarks.
trained_bank`): its rows, dim and dtype, resharded into each S of ``--shards`` (start-up
then counts the reshard), each layout checked to serve the same rows as the first.

Outputs in ``--output-dir``: ``results.parquet`` (one row per point), ``results.md``
(the table and the shards a bank of 1e9 rows needs) and three PNG plots.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from tempfile import TemporaryDirectory

from bank_server.shard import DTYPES, PROCESS_BYTES, RESTORE_COPIES
from benchmarks.args import comma_list, counts, positive_int
from benchmarks.memory import proc_bytes
from benchmarks.report import plot_lines, write_table
from benchmarks.servers import start_shards
from benchmarks.steps import run_step_clients
from benchmarks.trained_bank import QUERIES, TOP_K, TrainedBank

GIB, GB = 1 << 30, 1e9
DEFAULT = dict(rows="1e4,1e5,1e6,1e7,3e7,1e8", shards="1,2,4", negatives="256,1024,4096,16384,65536", iters=300)
DEFAULT |= dict(dtypes="float16,float32", clients="1,2,4")
QUICK = dict(DEFAULT, rows="1e4,1e5,1e6", shards="1,2", negatives="4096,16384", clients="1,2", iters=50)
COLUMNS = "rows shards negatives dtype clients step_p50_ms step_p99_ms steps_per_s rows_per_s startup_s".split()
COLUMNS += ["bytes_per_row", "raw_bytes_per_row"]
# Below this many bytes of rows a bank's RSS is mostly the process itself: the capacity
# model then counts the raw bytes.
_MIN_MEASURED_BYTES = 100_000_000


def _dtypes(text: str) -> list[str]:
    dtypes = comma_list(text, str.strip)
    if unknown := [d for d in dtypes if d not in DTYPES]:
        raise argparse.ArgumentTypeError(f"{', '.join(unknown)}: not among {', '.join(DTYPES)}")
    return dtypes


LISTS = {"rows": counts, "shards": counts, "negatives": counts, "dtypes": _dtypes, "clients": counts}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for name, kind in LISTS.items():
        parser.add_argument(f"--{name}", type=kind, help=f"comma-separated (default {DEFAULT[name]})")
    parser.add_argument("--iters", type=positive_int, help="timed Steps per client and point (default 300)")
    parser.add_argument("--dim", type=positive_int, default=128)
    parser.add_argument("--batch", type=positive_int, default=256, help="B: rows updated and looked up per Step")
    memory = "one shard's memory in the capacity model (GB)"
    parser.add_argument("--shard-memory-gb", type=float, default=64.0, help=memory)
    bank = "a finished training run's output folder: its bank resharded into each --shards, not synthetic banks"
    parser.add_argument("--bank", metavar="RUN_DIR", help=bank)
    parser.add_argument("--output-dir", default="runs/scale-bank")
    parser.add_argument("--quick", action="store_true", help=f"a small grid: {QUICK}")


def plan(s: dict) -> tuple[dict[tuple, list[tuple]], tuple]:
    """The banks (N, S, dtype), each with its points (K, C), and the base point
    (N, S, dtype, K, C): N x S at the base, then K, dtype and C alone."""

    def median(values):
        return sorted(values)[(len(values) - 1) // 2]

    n, shards, k = (median(s[key]) for key in ("rows", "shards", "negatives"))
    dtype, c = s["dtypes"][0], min(s["clients"])
    points = [(rows, count, dtype, k, c) for rows in s["rows"] for count in s["shards"]]
    points += [(n, shards, dtype, negatives, c) for negatives in s["negatives"]]
    points += [(n, shards, other, k, c) for other in s["dtypes"]]
    points += [(n, shards, dtype, k, clients) for clients in s["clients"]]
    banks: dict[tuple, list[tuple]] = {}
    for point in sorted(dict.fromkeys(points), key=lambda p: (p[0] * DTYPES[p[2]].itemsize, p[1:])):
        banks.setdefault(point[:3], []).append(point[3:])
    return banks, (n, shards, dtype, k, c)


def refusal(bank: tuple, points: list[tuple], dim: int, batch: int) -> str | None:
    """Why `bank` cannot run here, or None. Its peak is a Restore, which holds
    RESTORE_COPIES of the rows; the clients and this process count as shard-sized."""
    rows, shards, dtype = bank
    if rows < max(batch, shards, *(k for k, _ in points)):
        return f"skipping N={rows:,} S={shards}: N must be at least the batch, the shards and the negatives"
    processes = shards + max(c for _, c in points) + 1
    need = RESTORE_COPIES * rows * dim * DTYPES[dtype].itemsize + processes * PROCESS_BYTES
    available = proc_bytes("/proc/meminfo", "MemAvailable")
    usable = available - max(GIB, available // 10)
    if need > usable:
        return (
            f"skipping N={rows:,} S={shards} {dtype}: needs {need / GIB:.1f} GiB, {usable / GIB:.1f} GiB "
            f"available (MemAvailable {available / GIB:.1f} GiB less a safety margin)"
        )
    return None


def measure_bank(bank: tuple, points: list[tuple], dim: int, batch: int, iters: int, idle_rss: int, serve=None):
    """Start the bank's servers once (with `serve`, `start_shards`' signature); RSS right
    after start-up; then `serve.check(servers)`'s fields, if any; then every point."""
    rows, shards, dtype = bank
    with ExitStack() as stack:
        start = time.perf_counter()
        servers = (serve or start_shards)(stack, shards, rows, dim, dtype)
        startup_s = time.perf_counter() - start
        rss = sum(proc_bytes(f"/proc/{s.proc.pid}/status", "VmRSS") for s in servers)
        checked, results = serve.check(servers) if serve else {}, []
        for negatives, clients in points:
            load = run_step_clients([s.address for s in servers], rows, dim, batch, negatives, clients, iters)
            row = dict(rows=rows, shards=shards, negatives=negatives, dtype=dtype, clients=clients, dim=dim)
            row |= {key: load[key] for key in ("step_p50_ms", "step_p99_ms", "steps_per_s", "rows_per_s")}
            row |= dict(batch=batch, iters=iters, startup_s=startup_s, rss_bytes=rss, load_1m=os.getloadavg()[0])
            row |= dict(bytes_per_row=(rss - shards * idle_rss) / rows, raw_bytes_per_row=dim * DTYPES[dtype].itemsize)
            row |= checked
            results.append(row)
            print(f"N={rows:,} S={shards} {dtype} K={negatives} C={clients}: Step p50 {row['step_p50_ms']:.2f} ms")
    return results


def capacity(results: list[dict], idle_rss: int, shard_memory_gb: float, target: int = 10**9) -> list[str]:
    """The shards a bank of `target` rows needs per dtype, at the memory per row of the
    largest bank measured."""
    budget = shard_memory_gb * GB - idle_rss
    lines = [
        f"Shards of {shard_memory_gb:g} GB each that a bank of {target:,} rows needs (an idle shard process "
        f"holds {idle_rss / 1e6:.0f} MB; a Restore holds {RESTORE_COPIES}x the rows):",
        "",
        "| dtype | measured at N | bytes/row | raw bytes/row | shards | with Restore headroom |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for dtype in sorted({r["dtype"] for r in results}):
        row = max((r for r in results if r["dtype"] == dtype), key=lambda r: (r["rows"], -r["shards"]))
        raw = row["raw_bytes_per_row"]
        per_row = max(row["bytes_per_row"], raw) if row["rows"] * raw >= _MIN_MEASURED_BYTES else raw
        lines.append(
            f"| {dtype} | {row['rows']:,} | {row['bytes_per_row']:.1f} | {raw} "
            f"| {math.ceil(target * per_row / budget)} "
            f"| {math.ceil(RESTORE_COPIES * target * per_row / budget)} |"
        )
    return lines


def write_plots(output: Path, results: list[dict], base: tuple) -> list[Path]:
    """Step p50 against N (a line per S), throughput against C, Step p50 against K."""
    axes = ("rows", "shards", "dtype", "negatives", "clients")
    plots = [("latency_vs_rows", "rows", "step_p50_ms", "shards"), ("throughput_vs_clients", "clients", "rows_per_s")]
    plots += [("latency_vs_negatives", "negatives", "step_p50_ms")]
    written = []
    for name, x, y, *series in plots:
        free = (x, *series)  # the other axes at the base point
        rows = [r for r in results if all(r[a] == v for a, v in zip(axes, base) if a not in free)]
        title = f"{y} vs {x}, " + " ".join(f"{a}={v}" for a, v in zip(axes, base) if a not in free)
        written.append(plot_lines(output / f"{name}.png", rows, x, y, series, title=title, logx=x != "clients"))
    return written


def run(args: argparse.Namespace) -> int:
    if args.bank and (args.rows or args.dtypes):
        raise SystemExit("--bank takes the rows and the dtype from the run's bank: drop --rows and --dtypes")
    with TemporaryDirectory(prefix="scale-bank-") as scratch:  # --bank's reshards
        trained = TrainedBank(Path(args.bank), Path(scratch)) if args.bank else None
        preset = QUICK if args.quick else DEFAULT  # each list and --iters: as given, else --quick's, else the default
        s = {name: getattr(args, name) or kind(preset[name]) for name, kind in LISTS.items()}
        s["iters"], dim = args.iters or preset["iters"], trained.dim if trained else args.dim
        if trained:
            print(f"bank: {trained.name}, {trained.rows:,} rows x {dim} {trained.dtype}")
            if dropped := [k for k in s["negatives"] if k > trained.rows]:
                print(f"not swept: negatives {dropped}, more than the bank's rows")
            kept = [k for k in s["negatives"] if k <= trained.rows] or [trained.rows]
            s |= dict(rows=[trained.rows], dtypes=[trained.dtype], negatives=kept)
        banks, base = plan(s)
        print(f"{sum(map(len, banks.values()))} points on {len(banks)} banks; base (N, S, dtype, K, C) = {base}")
        with ExitStack() as stack:
            idle_rss = proc_bytes(f"/proc/{start_shards(stack, 1, 1, 1, 'float32')[0].proc.pid}/status", "VmRSS")
        results, skipped = [], []
        for bank, points in banks.items():
            # Checked just before it starts: memory the earlier banks freed, or others took, counts.
            if reason := refusal(bank, points, dim, args.batch):
                print(reason, flush=True)
                skipped.append(f"- {reason}")
            else:
                results += measure_bank(bank, points, dim, args.batch, s["iters"], idle_rss, trained)
    if not results:
        print("error: no point of this grid can run on this machine", file=sys.stderr)
        return 2
    notes = [
        f"Base point (N, S, dtype, K, C) = {base}; D={dim}, B={args.batch}. Each axis is swept alone around "
        "it. rows_per_s counts 2B + K rows per Step over all clients. bytes_per_row is the shards' RSS after "
        f"start-up less an idle shard's, per row. {os.cpu_count()} CPUs; other work shows as latency (load_1m).",
    ]
    if trained:
        notes += [
            "",
            f"Bank: {trained.name}, resharded into each S (startup_s includes the reshard; update log fsync no). "
            f"At every S the same {results[0]['sampled_rows']:,} sampled rows and {QUERIES} queries' top-{TOP_K}.",
        ]
    notes += ["", *capacity(results, idle_rss, args.shard_memory_gb), "", *skipped, "", "## Points"]
    output = Path(args.output_dir)
    plots = write_plots(output, results, base)
    write_table(results, output, "instdisc scale bank", notes, COLUMNS, plots)
    return 0
