"""The update log's and the snapshots' costs that `instdisc bench bank --fsync-modes`
does not show: ``python -m benchmarks.durability``.

- **Recovery**: ``bank_server.recovery.recover`` timed in this process on a snapshot of
  ``--recovery-rows`` rows (seconds per GB of snapshot) and on a log of ``--log-rows``
  logged rows written as Steps write them, ``--batch`` rows an update (seconds per 1e6
  logged rows: the replay alone, as recovery times it). Each is timed twice: with the files
  in the page cache (a restart on a live machine) and with their pages dropped
  (``posix_fadvise(DONTNEED)``: read from the disk, as after a reboot).
- **Step p99 while a shard snapshots**: one shard process of ``--snapshot-rows`` rows;
  Steps (the bench bank workload) run back to back, first alone, then during each of
  ``--runs`` Snapshot calls; the worst run's p99 is reported beside the p99 alone.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import grpc
import numpy as np

from bank_server.client import BankClient
from bank_server.recovery import open_logged, recover
from bank_server.shard import Layout
from benchmarks.args import positive_int
from benchmarks.processes import start_bank_processes
from benchmarks.timing import percentile_ms
from benchmarks.workload import MOMENTUM, StepWorkload
from protos import bank_pb2, bank_pb2_grpc


def _drop_cache(folder: Path) -> None:
    """Ask the kernel to forget the cached pages of every file in `folder` (clean pages
    only: the files were fsynced), so the next read comes from the disk."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _timed_recover(layout: Layout, folder: Path, cold: bool) -> tuple[float, object]:
    if cold:
        _drop_cache(folder)
    start = time.perf_counter()
    shard, recovery = recover(layout, folder, seed=0)
    return time.perf_counter() - start, recovery


def measure_recovery(rows: int, dim: int, dtype: str, log_rows: int, batch: int, workdir: Path) -> dict:
    out = {"rows": rows, "dim": dim, "dtype": dtype, "log_rows": log_rows, "batch": batch}
    # A snapshot and an empty log.
    layout = Layout(0, 1, rows, dim, dtype)
    folder = workdir / "snapshot"
    shard, _ = open_logged(layout, folder, seed=0, fsync="no")
    path, nbytes, _ = shard.snapshot(folder, "bench")
    shard.log.close()
    del shard
    for cold in (False, True):
        seconds, recovery = _timed_recover(layout, folder, cold)
        assert recovery.records_replayed == 0
        out[f"snapshot_{'cold' if cold else 'warm'}_s_per_gb"] = seconds / (nbytes / 1e9)
    out["snapshot_gb"] = nbytes / 1e9
    # The seeded rows plus a log of `log_rows` rows; the seeded rows alone timed apart.
    small = Layout(0, 1, max(batch, min(rows, 10**6)), dim, dtype)
    folder = workdir / "log"
    shard, _ = open_logged(small, folder, seed=0, fsync="no")
    work = StepWorkload(small.total_rows, dim, batch, seed=0)
    updates = -(-log_rows // batch)
    for i in range(updates):
        shard.momentum_update(work.indices(i), work.features(i), MOMENTUM, "bench", i + 1)
    shard.log.close()
    del shard
    log_bytes = sum(p.stat().st_size for p in folder.rglob("log-*.wal"))
    for cold in (False, True):
        _, recovery = _timed_recover(small, folder, cold)
        assert recovery.records_replayed == updates
        out[f"log_{'cold' if cold else 'warm'}_s_per_1e6_rows"] = recovery.replay_seconds / (updates * batch / 1e6)
    out["log_bytes_per_row"] = log_bytes / (updates * batch)
    return out


def measure_snapshot_p99(rows: int, dim: int, dtype: str, batch: int, negatives: int, runs: int, alone: int,
                         workdir: Path) -> dict:
    work = StepWorkload(rows, dim, batch, seed=0)
    with ExitStack() as stack:
        (server,) = start_bank_processes(stack, 1, rows, dim, dtype, snapshot_dir=workdir / "p99",
                                         extra=["--keep-snapshots", "1"])
        client = stack.enter_context(BankClient([server.address], timeout=300))
        channel = stack.enter_context(grpc.insecure_channel(server.address))
        stub = bank_pb2_grpc.MemoryBankStub(channel)
        step = iter(range(10**9))

        def one_step() -> float:
            i = next(step)
            start = time.perf_counter()
            client.step(work.indices(i), work.features(i), MOMENTUM, work.indices(i + 1), negatives)
            return time.perf_counter() - start

        for _ in range(30):
            one_step()
        alone_s = [one_step() for _ in range(alone)]
        during = []
        for run in range(runs):
            answer: dict = {}
            done = threading.Event()

            def snap(tag=f"run-{run}"):
                answer["response"] = stub.Snapshot(bank_pb2.SnapshotRequest(tag=tag), timeout=600)
                done.set()

            writer = threading.Thread(target=snap)
            writer.start()
            seconds = []
            while not done.is_set():
                seconds.append(one_step())
            writer.join()
            during.append({"steps": len(seconds), "step_p50_ms": percentile_ms(seconds, 50),
                           "step_p99_ms": percentile_ms(seconds, 99), "step_max_ms": max(seconds) * 1e3,
                           "snapshot_s": answer["response"].seconds, "snapshot_gb": answer["response"].bytes / 1e9})
    return {"rows": rows, "dim": dim, "dtype": dtype, "batch": batch, "negatives": negatives,
            "alone_step_p50_ms": percentile_ms(alone_s, 50), "alone_step_p99_ms": percentile_ms(alone_s, 99),
            "runs": during, "max_step_p99_ms": max(r["step_p99_ms"] for r in during)}


def add_durability_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `python -m benchmarks.durability` (and of a CLI that registers it)."""
    parser.add_argument("--dim", type=positive_int, default=128)
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    parser.add_argument("--batch", type=positive_int, default=256)
    parser.add_argument("--negatives", type=positive_int, default=4096)
    parser.add_argument("--recovery-rows", type=positive_int, default=4 * 10**6, help="rows of the recovered snapshot")
    parser.add_argument("--log-rows", type=positive_int, default=10**6, help="logged rows replayed")
    parser.add_argument("--snapshot-rows", type=positive_int, default=10**7, help="rows of the snapshotting shard")
    parser.add_argument("--runs", type=positive_int, default=3)
    parser.add_argument("--alone", type=positive_int, default=300, help="Steps timed with no snapshot running")
    parser.add_argument("--skip", choices=("recovery", "snapshot"), action="append", default=[])
    parser.add_argument("--dir", help="working folder, on the disk to measure (default: a temporary one)")
    parser.add_argument("--json", dest="json_path")


def run_durability(args: argparse.Namespace) -> int:
    results = {}
    with tempfile.TemporaryDirectory(prefix="durability-", dir=args.dir) as tmp:
        if "recovery" not in args.skip:
            r = results["recovery"] = measure_recovery(args.recovery_rows, args.dim, args.dtype, args.log_rows,
                                                       args.batch, Path(tmp))
            print(f"recovery: snapshot of {r['snapshot_gb']:.2f} GB: {r['snapshot_warm_s_per_gb']:.2f} s/GB cached, "
                  f"{r['snapshot_cold_s_per_gb']:.2f} s/GB from disk; log ({r['log_bytes_per_row']:.0f} bytes/row): "
                  f"{r['log_warm_s_per_1e6_rows']:.2f} s per 1e6 rows cached, {r['log_cold_s_per_1e6_rows']:.2f} "
                  "from disk", flush=True)
        if "snapshot" not in args.skip:
            r = results["snapshot"] = measure_snapshot_p99(args.snapshot_rows, args.dim, args.dtype, args.batch,
                                                           args.negatives, args.runs, args.alone, Path(tmp))
            print(f"Step alone: p50 {r['alone_step_p50_ms']:.2f} ms, p99 {r['alone_step_p99_ms']:.2f} ms", flush=True)
            for i, run in enumerate(r["runs"]):
                print(f"during snapshot {i + 1} ({run['snapshot_gb']:.2f} GB in {run['snapshot_s']:.1f} s, "
                      f"{run['steps']} Steps): p50 {run['step_p50_ms']:.2f} ms, p99 {run['step_p99_ms']:.2f} ms, "
                      f"max {run['step_max_ms']:.1f} ms", flush=True)
            print(f"Step p99 while snapshotting, worst of {args.runs} runs: {r['max_step_p99_ms']:.2f} ms")
    if args.json_path:
        with open(args.json_path, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.durability", description=__doc__.split("\n\n")[0])
    add_durability_arguments(parser)
    return run_durability(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
