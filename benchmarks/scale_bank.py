"""`instdisc scale bank`: what the memory bank costs as it grows, on real shard servers.

Each point of the sweep is a bank of N rows on S shard processes (loopback gRPC, one
BLAS thread each, as `instdisc bench bank` runs them) with K negatives per `Step`,
rows stored in one dtype, and C client processes calling `Step` in a loop together.
A full cartesian grid would take hours, so each axis is swept alone around a base
point (`benchmarks.bank_grid`). Points that share (N, S, dtype) share one set of
servers, which also gives the per-bank numbers (`benchmarks.bank_costs`): start-up
time, memory per row, `PartitionSum`/`TopK` time and snapshot write and restore speed.

A bank that would not fit in memory is refused before anything starts.

Outputs in ``--output-dir``: ``results.parquet`` (one row per point), ``results.md``
(the table, the target checks and the capacity model) and PNG plots.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
from argparse import ArgumentTypeError
from dataclasses import dataclass
from pathlib import Path

from benchmarks.args import comma_list, positive_int
from benchmarks.bank_costs import idle_server_rss, measure_bank
from benchmarks.bank_grid import (GB, GIB, ITEMSIZE, RESTORE_COPIES, Bank, BankPoint, format_rows, memory_available,
                                  plan_grid, refusal)
from benchmarks.report import plot_lines, write_table
from benchmarks.workload import step_message_bytes

DEFAULTS = {"rows": "1e4,1e5,1e6,1e7,3e7,1e8", "shards": "1,2,4", "negatives": "256,1024,4096,16384,65536",
            "dtypes": "float16,float32", "clients": "1,2,4", "iters": 300}
QUICK = {"rows": "1e4,1e5,1e6", "shards": "1,2", "negatives": "4096,16384", "dtypes": "float16,float32",
         "clients": "1,2", "iters": 50}

# Below this many bytes of rows a bank's RSS is mostly allocator noise (tens of MB of
# start-up temporaries the heap keeps), so the capacity model uses the raw bytes.
_MIN_MEASURED_BYTES = 100_000_000

TABLE_COLUMNS = ("rows", "shards", "negatives", "dtype", "clients", "step_p50_ms", "step_p99_ms", "rows_per_s",
                 "sample_p50_ms", "lookup_p50_ms", "update_p50_ms", "partition_sum_ms", "topk_ms", "startup_s",
                 "bytes_per_row", "raw_bytes_per_row", "snapshot_write_gbps", "disk_write_gbps", "restore_gbps")


def add_scale_bank_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", help=f"comma-separated bank sizes N (default {DEFAULTS['rows']})")
    parser.add_argument("--shards", help=f"comma-separated shard counts S (default {DEFAULTS['shards']})")
    parser.add_argument("--negatives", help=f"comma-separated negatives K per Step (default {DEFAULTS['negatives']})")
    parser.add_argument("--dtypes", help=f"comma-separated row dtypes (default {DEFAULTS['dtypes']})")
    parser.add_argument("--clients", help=f"comma-separated concurrent Step clients (default {DEFAULTS['clients']})")
    parser.add_argument("--iters", type=positive_int, help=f"timed calls per point and client "
                                                           f"(default {DEFAULTS['iters']}, --quick {QUICK['iters']})")
    parser.add_argument("--dim", type=positive_int, default=128)
    parser.add_argument("--batch", type=positive_int, default=256,
                        help="B: rows updated and looked up per Step; also the queries per PartitionSum/TopK")
    parser.add_argument("--shard-memory-gb", type=float, default=64.0,
                        help="per-shard memory budget of the capacity model (GB)")
    parser.add_argument("--output-dir", default="runs/scale-bank")
    parser.add_argument("--quick", action="store_true",
                        help=f"a small grid for CI: rows {QUICK['rows']}, shards {QUICK['shards']}, ...")


def _dtype(text: str) -> str:
    text = text.strip()
    if text not in ITEMSIZE:
        raise ArgumentTypeError(f"{text!r} is not one of {', '.join(ITEMSIZE)}")
    return text


# -- what the numbers say -------------------------------------------------------------

def _largest(rows: list[dict], **match) -> dict | None:
    """The row with the largest N (then the fewest shards) among those matching."""
    found = [r for r in rows if all(r[k] == v for k, v in match.items())]
    return max(found, key=lambda r: (r["rows"], -r["shards"]), default=None)


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def target_checks(results: list[dict], base: BankPoint) -> list[str]:
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


def capacity_model(results: list[dict], base: BankPoint, batch: int, idle_rss: int, shard_memory_gb: float,
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
                     f"| {math.ceil(RESTORE_COPIES * target_rows * per_row / budget)} |")
    lines += ["", (f"Bytes on the wire per Step (B={batch}, K={base.negatives}, D={base.bank.dim}; "
                   "float32 features in, rows in the bank's dtype out):"), "",
              "| dtype | shards | request bytes | answer bytes | per step | at 1,000 steps/s |",
              "|---|---:|---:|---:|---:|---:|"]
    for dtype in sorted({r["dtype"] for r in results}):
        for shards in sorted({r["shards"] for r in results}):
            sizes = step_message_bytes(batch, base.negatives, base.bank.dim, dtype, shards)
            request, answer = sum(s[0] for s in sizes), sum(s[1] for s in sizes)
            lines.append(f"| {dtype} | {shards} | {request:,} | {answer:,} | {(request + answer) / 1e6:.2f} MB "
                         f"| {(request + answer) * 1000 / GB:.2f} GB/s |")
    return lines


def write_plots(output: Path, results: list[dict], base: BankPoint) -> list[Path]:
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

    def listed(name, kind):
        text = pick(name)
        try:
            return comma_list(text, kind)
        except ArgumentTypeError as error:
            raise ValueError(f"--{name} {text!r}: {error}") from None

    return {"rows": listed("rows", positive_int), "shards": listed("shards", positive_int),
            "negatives": listed("negatives", positive_int), "dtypes": listed("dtypes", _dtype),
            "clients": listed("clients", positive_int), "iters": pick("iters")}


def _invalid(point: BankPoint, batch: int) -> str | None:
    bank = point.bank
    if bank.rows < max(batch, point.negatives, bank.shards):
        return f"skipping {point}: N must be at least the batch ({batch}), the negatives and the shards"
    return None


def _plan(settings: dict, batch: int, dim: int) -> tuple[dict[Bank, list[BankPoint]], BankPoint, list[str]]:
    """The banks to start, each with its points; the base point; and what is skipped
    and why, decided before anything starts."""
    points, base = plan_grid(settings["rows"], settings["shards"], settings["negatives"], settings["dtypes"],
                             settings["clients"], dim)
    skipped = []
    banks: dict[Bank, list[BankPoint]] = {}
    for point in points:
        reason = _invalid(point, batch)
        if reason:
            skipped.append(reason)
        else:
            banks.setdefault(point.bank, []).append(point)
    return banks, base, skipped


def _refusal_now(bank: Bank, points: list[BankPoint], directory: Path) -> str | None:
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


def _sweep(banks: dict[Bank, list[BankPoint]], batch: int, iters: int, idle_rss: int, workdir: Path,
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


def _report(output: Path, results: list[dict], base: BankPoint, machine: Machine, skipped: list[str],
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
