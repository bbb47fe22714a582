"""Python child processes that the tests talk to through their output lines: bank
shard servers (``python -m bank_server``) and small scripts.

Each child's stdout is read on a thread, so waiting for a line honours its timeout
even when the child hangs without printing; a child that fails to say what was
expected in time is killed, and the error carries the end of its stderr.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

_STDERR_TAIL_CHARS = 4000
_START_S = 60.0


class ChildFailed(RuntimeError):
    """A child process exited or stalled before printing what it was expected to."""


class ChildProcess:
    """``python ARGS...`` with its stdout lines in ``lines`` as they come.

    stderr goes to the file `stderr` when given; otherwise into a pipe that is read
    when the process has ended (a child that writes more than the pipe holds, 64 KiB,
    while running would block: long-lived chatty children should get a file).
    """

    def __init__(self, args: Sequence[str], *, stderr: Path | None = None, stdin: bool = False):
        self.args = list(args)
        self._stderr_path = stderr
        self._stderr_file = open(stderr, "w") if stderr is not None else None
        self.proc = subprocess.Popen(
            [sys.executable, *self.args],
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr_file or subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._cursor = 0  # lines before it were looked at by expect()
        self._ended = False
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, name=f"stdout of pid {self.proc.pid}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        self.proc.stdout.close()
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def expect(self, pattern: str, timeout: float) -> re.Match:
        """The first match of `pattern` in a line not yet looked at, waiting up to
        `timeout` seconds for it; raises ChildFailed (and kills the child) otherwise."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                while self._cursor < len(self.lines):
                    found = re.search(pattern, self.lines[self._cursor])
                    self._cursor += 1
                    if found:
                        return found
                if self._ended:
                    # Its output closes as it exits: a moment more gives its own exit status.
                    why, grace = f"ended its output before printing {pattern!r}", 5.0
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    why, grace = f"printed no {pattern!r} within {timeout:g} s", 0.0
                    break
                self._changed.wait(left)
        raise self._failure(why, grace)

    def send(self, line: str) -> None:
        """Write one line to the child's stdin (started with ``stdin=True``)."""
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def _failure(self, why: str, grace: float) -> ChildFailed:
        """Ends the child, after `grace` seconds to exit by itself, and says why it failed."""
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        tail = self._stderr_tail()
        status = self.stop()
        return ChildFailed(f"python {' '.join(self.args)} {why} (exit status {status}); its stderr ends:\n{tail}")

    def _stderr_tail(self) -> str:
        if self._stderr_path is not None:
            return self._stderr_path.read_text(errors="replace")[-_STDERR_TAIL_CHARS:]
        return self.proc.stderr.read()[-_STDERR_TAIL_CHARS:]

    def stop(self, sig: int = signal.SIGKILL, timeout: float = 30.0) -> int:
        """Send `sig` unless the child has ended, give it `timeout` seconds, then kill
        it; close its pipes and return its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # The output ends with the process, unless a grandchild still holds it.
        self._reader.join(timeout)
        for stream in (self.proc.stdin, self.proc.stderr, self._stderr_file):
            if stream is not None:
                stream.close()
        return self.proc.returncode

    def __enter__(self) -> ChildProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class ServerProcess(ChildProcess):
    """A child that prints ``listening on HOST:PORT`` once bound (and, for a bank shard,
    ``SERVING`` once its rows are loaded); constructed when it has said where it listens."""

    def __init__(self, args: Sequence[str], *, stderr: Path | None = None, timeout: float = _START_S):
        super().__init__(args, stderr=stderr)
        self.address: str = self.expect(r"listening on (\S+)", timeout).group(1)
        self._serving = False

    def wait_serving(self, timeout: float = _START_S) -> None:
        if not self._serving:
            self.expect(r"\bSERVING\b", timeout)
            self._serving = True
