"""A finished training run's bank for `instdisc scale bank --bank RUN_DIR`: found as
`trainer.neighbors` finds it, resharded into S shards (`bank_server.reshard`) and
served by S real shard processes, with a check that every layout serves the same rows."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from bank_server.client import BankClient
from bank_server.reshard import reshard, source_layout
from benchmarks.servers import start_shards
from trainer import checkpoint
from trainer.snapshot_bank import run_snapshots

PROBE_ROWS, QUERIES, TOP_K = 4096, 16, 10


class TrainedBank:
    """The bank of the run in `run` at the snapshot its last checkpoint names (without
    one: what each shard's LATEST and log hold). Called as `start_shards` is, it
    reshards into `scratch/shards-S` (removed once the servers stop) and serves that
    folder (update log fsync 'no'). `check(servers)` reads the rows at a fixed sample of
    global indices (byte for byte) and the top-k similarities of some of them as
    queries (to 1e-5: a layout may sum in another order) before any Step changes the
    bank, and raises when a layout serves other ones than the first."""

    def __init__(self, run: Path, scratch: Path):
        state = checkpoint.load(run / "checkpoint") if (run / "checkpoint" / checkpoint.FILE).exists() else {}
        configured, self.tag = state.get("config", {}).get("bank", {}).get("snapshot_dir"), state.get("bank_snapshot")
        self.source = run_snapshots(run, configured, self.tag)
        _, self.rows, self.dim, self.dtype = source_layout(self.source, self.tag)
        self.name, self.scratch = f"{self.source} snapshot {self.tag or 'LATEST'}", scratch
        self.indices = np.random.default_rng(0).choice(self.rows, min(self.rows, PROBE_ROWS), replace=False)
        self.first: tuple | None = None

    def __call__(self, stack, shards: int, rows: int, dim: int, dtype: str):
        dest = reshard(self.source, self.scratch / f"shards-{shards}", shards, self.tag).dest
        stack.callback(shutil.rmtree, dest, ignore_errors=True)  # runs after the servers are killed
        return start_shards(stack, shards, rows, dim, dtype, "no", snapshot_dir=dest)

    def check(self, servers) -> dict:
        with BankClient([s.address for s in servers], timeout=120) as client:
            rows = client.lookup(self.indices)
            sims, _ = client.topk(rows[:QUERIES].astype(np.float32), min(TOP_K, self.rows))
        self.first = self.first or (rows, sims, len(servers))
        rows0, sims0, shards0 = self.first
        differ = int((rows.view(np.uint8) != rows0.view(np.uint8)).any(axis=1).sum())
        if differ or not np.allclose(sims, sims0, rtol=0, atol=1e-5):
            raise RuntimeError(
                f"the bank resharded into {len(servers)} shards is not the one served by {shards0}: "
                f"{differ} of {len(rows)} sampled rows differ, top-{TOP_K} similarities by up to "
                f"{np.abs(sims - sims0).max():.2g}"
            )
        return dict(bank=self.name, same_bank=True, sampled_rows=len(rows))
