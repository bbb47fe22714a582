"""`instdisc bench reshard`: the time and peak memory of `instdisc bank reshard` on a
synthetic bank (per shard a snapshot of random row bytes, then --updates log records of
256 rows), run as a process of its own; a sample of rows is then checked byte for byte."""

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from bank_server import snapshot as snapshots
from bank_server.shard import Layout
from bank_server.update_log import UpdateLog
from benchmarks.args import positive_int

BLOCK, RECORD = 1 << 16, 256  # rows of a snapshot batch and of a log record
# VmHWM, unlike ru_maxrss, does not carry over the parent's peak across a (v)fork and exec.
CHILD = "import sys, trainer.cli as c; r = c.main(sys.argv[1:]); print(open('/proc/self/status').read()); exit(r)"


def add_arguments(parser) -> None:
    parser.description = __doc__.split("\n\n")[0].replace("`", "")
    for flag, default in (("--rows", 10_000_000), ("--dim", 128), ("--from", 2), ("--to", 3), ("--updates", 1000)):
        parser.add_argument(flag, type=positive_int, default=default)


def build(folder: Path, rows: int, dim: int, shards: int, updates: int, sample: set[int]) -> dict[int, np.ndarray]:
    """The source bank; returns the last row the logs wrote for each index of `sample`."""
    logged, rng = {}, np.random.default_rng(0)
    for sid in range(shards):
        layout = Layout(sid, shards, rows, dim)
        meta = snapshots.metadata(vars(layout), "bench", 1)
        sizes = (min(BLOCK, layout.rows_held - b) for b in range(0, layout.rows_held, BLOCK))
        blocks = ((rng.integers(1 << 16, size=(n, dim), dtype=np.uint16).view(np.float16), 0) for n in sizes)
        snapshots.write(folder, sid, "bench", meta, dim, np.float16, blocks)
        log = UpdateLog(snapshots.shard_dir(folder, sid), layout, "no", base="bench")
        for k in range(updates):
            local = rng.choice(layout.rows_held, RECORD, replace=False)
            new = rng.integers(1 << 16, size=(RECORD, dim), dtype=np.uint16).view(np.float16)
            log.append(local, new, "bench", k)
            logged.update((int(g), row) for g, row in zip(local * shards + sid, new) if g in sample)
        log.close()
        snapshots.write_latest(folder, sid, "bench", log.segment, 0)
    return logged


def run(args) -> int:
    root, s, n = Path(tempfile.mkdtemp(prefix="bench-reshard-")), args.__dict__["from"], args.to
    sample = set(np.random.default_rng(1).choice(args.rows, min(args.rows, 4096), replace=False).tolist())
    try:
        logged = build(root / "source", args.rows, args.dim, s, args.updates, sample)
        started = time.perf_counter()
        command = ["bank", "reshard", str(root / "source"), str(root / "dest"), "--shards", str(n)]
        done = subprocess.run([sys.executable, "-c", CHILD, *command], stdout=subprocess.PIPE, text=True, check=True)
        seconds = time.perf_counter() - started
        peak = int(next(line for line in done.stdout.splitlines() if line.startswith("VmHWM")).split()[1]) << 10
        same = sum(
            row(root / "dest", g % n, "resharded", g // n)
            == (logged[g].tobytes() if g in logged else row(root / "source", g % s, "bench", g // s))
            for g in sample
        )
        print(done.stdout.splitlines()[0], f"{seconds:.1f} s, peak RSS {peak / 1e6:,.0f} MB", sep="\n", end=", ")
        print(f"bank {args.rows * args.dim * 2 / 1e9:.2f} GB; {same} of {len(sample)} sampled rows byte-identical")
        return 0 if same == len(sample) else 1
    finally:
        shutil.rmtree(root, ignore_errors=True)


def row(bank: Path, shard: int, tag: str, local: int) -> bytes:
    """One row of a shard's snapshot, read from a memory map of its file (batches of equal rows but the last)."""
    reader = pa.ipc.open_file(pa.memory_map(str(snapshots.snapshot_path(bank, shard, tag))))
    size = reader.get_batch(0).num_rows
    return reader.get_batch(local // size).column(0)[local % size].values.to_numpy().tobytes()
