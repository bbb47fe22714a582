"""Servers as child processes, as a deployment runs them: bank shards (``python -m
bank_server``) and the gRPC echo; and where a process's threads may run (Linux)."""

from __future__ import annotations

import collections
import contextlib
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from subprocess import DEVNULL, PIPE, STDOUT

# A shard's start: the interpreter, then initialising its rows (about 500,000 a second
# on one core; five times as long is allowed).
START_S, ROWS_PER_S = 60.0, 100_000


class Server:
    """``python ARGS...``, constructed once it prints ``listening on HOST:PORT``. Its
    output is drained on a thread, so a wait honours its timeout; a child that does not
    say what is expected in time is killed and the error carries its last lines."""

    def __init__(self, args: list[str], timeout: float = START_S):
        self.args = args
        self.proc = subprocess.Popen([sys.executable, *args], stdin=DEVNULL, stdout=PIPE, stderr=STDOUT, text=True)
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._tail: collections.deque[str] = collections.deque(maxlen=30)
        threading.Thread(target=self._read, daemon=True).start()
        self.address = self.expect(r"listening on (\S+)", timeout).group(1)

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def expect(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                self.stop()
                raise RuntimeError(
                    f"python {' '.join(self.args)} printed no {pattern!r} within {timeout:g} s "
                    f"(exit status {self.proc.returncode}); its output ends:\n{''.join(self._tail)}"
                )
            self._tail.append(line)
            if found := re.search(pattern, line):
                return found

    def stop(self) -> None:
        """Kill it: a shard told to stop with SIGTERM would first write a final
        snapshot, which costs seconds per GB and measures nothing."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def start_shards(stack: ExitStack, shards: int, rows: int, dim: int, dtype: str, fsync=None, snapshot_dir=None):
    """The `shards` processes of one bank on loopback, started together, each with one
    BLAS thread (the server's default); returns once every one serves; killed when
    `stack` closes. With `fsync` or `snapshot_dir` each keeps an update log (in that
    fsync mode, else the server's default), as a deployed shard does, in `snapshot_dir`,
    whose LATEST snapshots it serves, else in a temporary folder."""
    timeout = START_S + rows / ROWS_PER_S
    deadline = time.monotonic() + timeout
    extra = ["--fsync", fsync] if fsync else []
    if fsync or snapshot_dir:
        extra += ["--snapshot-dir", str(snapshot_dir or stack.enter_context(tempfile.TemporaryDirectory()))]
    servers = []
    for shard in range(shards):
        args = ["-m", "bank_server", "--shard-id", str(shard), "--num-shards", str(shards), "--rows", str(rows)]
        args += ["--dim", str(dim), "--dtype", dtype, "--port", "0", *extra]
        servers.append(Server(args, timeout))
        stack.callback(servers[-1].stop)
    for server in servers:
        server.expect(r"\bSERVING\b", max(0.0, deadline - time.monotonic()))
    return servers


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time process `pid` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of process `pid` onto `cpus`; threads it starts later inherit that.
    Twice over, for a thread started while the first round listed them."""
    for _ in range(2):
        for tid in map(int, os.listdir(f"/proc/{pid}/task")):
            with contextlib.suppress(ProcessLookupError):  # the thread ended meanwhile
                os.sched_setaffinity(tid, cpus)


def affinity(pid: int) -> set[int]:
    """The cores any thread of process `pid` may run on."""
    cores: set[int] = set()
    for tid in map(int, os.listdir(f"/proc/{pid}/task")):
        with contextlib.suppress(ProcessLookupError):
            cores |= os.sched_getaffinity(tid)
    return cores
