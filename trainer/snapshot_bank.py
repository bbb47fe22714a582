"""A finished run's bank served again from its snapshots, to be read: one
``python -m bank_server`` child process per shard on loopback, stopped on leaving.

The shards serve a linked copy of the snapshot folder (hard links, a copy across
filesystems) in a temporary folder: a shard opens a new log segment when it starts, and
the run's own folder, which a resume restores from, stays as training left it.
"""

from __future__ import annotations

import os
import re
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from bank_server.snapshot import shard_dir


class NoSnapshot(FileNotFoundError):
    """No bank snapshot where one should be; the message names the folder."""


class ShardDidNotStart(RuntimeError):
    """A shard process ended or stalled before serving; the message carries its last words."""


def run_snapshots(run: Path, snapshot_dir: str | None, tag: str | None) -> Path:
    """The folder of run folder `run`'s shard snapshots (``<root>/<run name>/shard-*``,
    `root` its `bank.snapshot_dir`, else ``<run>/bank``): the only one there, or the one
    whose shards hold the checkpoint's snapshot `tag`."""
    root = Path(os.path.expandvars(os.path.expanduser(snapshot_dir))) if snapshot_dir else run / "bank"
    runs = sorted(d for d in root.iterdir() if d.is_dir() and any(d.glob("shard-*"))) if root.is_dir() else []
    if not runs:
        raise NoSnapshot(f"no bank snapshots in {root} (a folder per run name, each with shard-*/)")
    if len(runs) > 1 and tag:
        runs = [d for d in runs if (shard_dir(d, 0) / f"{tag}.arrow").exists()] or runs
    if len(runs) > 1:
        names = ", ".join(d.name for d in runs)
        raise NoSnapshot(f"{root} holds the banks of several runs ({names}); set bank.snapshot_dir to one of them")
    return runs[0]


def _link_tree(source: Path, target: Path) -> None:
    target.mkdir()
    for path in source.iterdir():
        if path.is_file() and not path.name.startswith("."):  # not a dead writer's temporary
            try:
                os.link(path, target / path.name)
            except OSError:  # another filesystem, or one without hard links
                shutil.copy2(path, target / path.name)


@contextmanager
def served_snapshots(folder: Path, rows: int, dim: int, dtype: str, timeout: float):
    """The addresses of the run's shards (``folder/shard-*``, one each) serving the
    snapshot each one's LATEST names, with `rows` rows in all of `dim` `dtype`."""
    shards = sorted(folder.glob("shard-*"))
    if not shards:
        raise NoSnapshot(f"no shard-*/ folders in {folder}")
    with tempfile.TemporaryDirectory(prefix="instdisc-bank-") as copy:
        children = []
        try:
            for s, source in enumerate(shards):
                _link_tree(source, shard_dir(copy, s))
                children.append(_start_shard(s, len(shards), rows, dim, dtype, copy))
            deadline = time.monotonic() + timeout
            yield [_wait_serving(child, deadline) for child in children]
        finally:
            for _, child, log_file in children:
                child.kill()  # a throwaway copy: no final snapshot to write
                child.wait()
                child.stdout.close()
                log_file.close()


def _start_shard(shard: int, shards: int, rows: int, dim: int, dtype: str, directory: str):
    log_file = tempfile.TemporaryFile("w+")  # its log lines, for the error when it fails
    args = ["--shard-id", shard, "--num-shards", shards, "--rows", rows, "--dim", dim, "--dtype", dtype]
    child = subprocess.Popen(
        [sys.executable, "-m", "bank_server", *map(str, args), "--port", "0", "--snapshot-dir", directory],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=log_file,
    )
    return shard, child, log_file


def _wait_serving(started, deadline: float) -> str:
    """The shard's address once it says SERVING; ShardDidNotStart with its last line otherwise."""
    shard, child, log_file = started
    said, address = b"", None
    with selectors.DefaultSelector() as selector:
        selector.register(child.stdout, selectors.EVENT_READ)
        # os.read, not readline: a buffered reader may hold the next line where select cannot see it.
        while (left := deadline - time.monotonic()) > 0 and selector.select(left):
            chunk = os.read(child.stdout.fileno(), 4096)
            if not chunk:  # it exited
                break
            said += chunk
            if found := re.search(rb"listening on (\S+)", said):
                address = found.group(1).decode()
            if address and re.search(rb"\bSERVING\b", said):
                return address
    log_file.seek(0)
    lines = [line.strip() for line in log_file.read().splitlines() if line.strip()]
    why = "exited" if child.poll() is not None else "did not serve in time"
    raise ShardDidNotStart(f"bank shard {shard} {why}: {lines[-1] if lines else 'no output'}")
