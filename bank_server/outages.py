"""What a `BankClient` saw of its shards being unreachable: one WARNING when a shard first
fails to answer, one INFO when it answers again (how long it was out, how many calls
were retried meanwhile), a "still unreachable" WARNING at most every `REMIND_S` seconds
in between, and a record of every outage for a run's summary.

One tracker per client, shared by the threads that call through it (a BankFeed thread
and the training loop), so it takes a lock; the hot path (a shard that answers while
none is out) reads one dict and takes no lock.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass

log = logging.getLogger("bank_server.client")

# Between the first line and the recovery line, a reminder at most this often: enough to
# see a long outage in a log without a line per retry.
REMIND_S = 10.0


@dataclass
class Outage:
    shard: int
    address: str
    code: str  # the gRPC status of the first failed call (UNAVAILABLE)
    started: float  # unix time of the first failed call
    seconds: float  # how long it was out; so far, while `ongoing`
    retries: int  # calls to it retried during the outage
    ongoing: bool = True

    def as_dict(self) -> dict:
        return asdict(self)


class OutageTracker:
    def __init__(self):
        self._lock = threading.Lock()
        self._open: dict[int, tuple[Outage, float, float]] = {}  # shard -> (outage, monotonic start, last line)
        self._closed: list[Outage] = []

    def failed(self, shard: int, address: str, code: str) -> None:
        """A call to `shard` failed with a status that is retried; it will be retried."""
        now = time.monotonic()
        with self._lock:
            if shard not in self._open:
                outage = Outage(shard, address, code, time.time(), 0.0, 1)
                self._open[shard] = (outage, now, now)
                log.warning("bank shard %d at %s unreachable (%s); retrying", shard, address, code)
                return
            outage, began, said = self._open[shard]
            outage.retries += 1
            outage.address = address  # it may have moved (a restarted Ray actor)
            if now - said >= REMIND_S:
                self._open[shard] = (outage, began, now)
                log.warning(
                    "bank shard %d at %s still unreachable after %.1f s (%d retries)",
                    shard,
                    address,
                    now - began,
                    outage.retries,
                )

    def answered(self, shard: int) -> None:
        """A call to `shard` succeeded: ends its outage, if it had one."""
        if shard not in self._open:  # the common case: no lock
            return
        with self._lock:
            entry = self._open.pop(shard, None)
            if entry is None:
                return
            outage, began, _ = entry
            outage.seconds, outage.ongoing = time.monotonic() - began, False
            self._closed.append(outage)
        log.info(
            "bank shard %d at %s reachable again after %.2f s (%d retries)",
            shard,
            outage.address,
            outage.seconds,
            outage.retries,
        )

    def outages(self) -> list[dict]:
        """Every outage so far, oldest first; ongoing ones with their seconds so far."""
        now = time.monotonic()
        with self._lock:
            ongoing = [Outage(**{**o.as_dict(), "seconds": now - began}) for o, began, _ in self._open.values()]
            return [o.as_dict() for o in sorted(self._closed + ongoing, key=lambda o: o.started)]
