"""The grid of `instdisc scale bank`: banks (N rows on S shards in one dtype), the
points measured on them, the one-axis-at-a-time plan, and what a bank needs of the
machine, so that one too large is refused before anything starts (this machine has
no swap: the alternative is the OOM killer, not a slow point)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from bank_server.shard import PROCESS_BYTES, RESTORE_COPIES

GIB = 1 << 30
GB = 1e9  # throughputs and the capacity model count in decimal GB, as disks and budgets do
ITEMSIZE = {"float16": 2, "float32": 4}
# Kept free of the machine's MemAvailable: the page cache and everything else need room.
_MARGIN_FRACTION, _MIN_MARGIN = 0.1, 1 * GIB


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
class BankPoint:
    """One measurement: K negatives per `Step` from C concurrent clients on a bank."""
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
              dim: int) -> tuple[list[BankPoint], BankPoint]:
    """The points of the one-axis-at-a-time sweep, grouped by bank, and the base point
    (the lower median of the rows, shards and negatives, the first dtype, the fewest
    clients): N x S, then K, dtype and C at the base."""
    base = BankPoint(Bank(_lower_median(rows), _lower_median(shards), dim, dtypes[0]), _lower_median(negatives),
                     min(clients))
    points = [BankPoint(Bank(n, s, dim, base.bank.dtype), base.negatives, base.clients) for n in rows for s in shards]
    points += [BankPoint(base.bank, k, base.clients) for k in negatives]
    points += [BankPoint(Bank(base.bank.rows, base.bank.shards, dim, d), base.negatives, base.clients) for d in dtypes]
    points += [BankPoint(base.bank, base.negatives, c) for c in clients]
    unique = list(dict.fromkeys(points))
    unique.sort(key=lambda p: (p.bank.raw_bytes, p.bank.shards, p.bank.dtype, p.negatives, p.clients))
    return unique, base


def memory_available() -> int:
    """MemAvailable from /proc/meminfo, in bytes."""
    found = re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
    return int(found.group(1)) * 1024


def memory_need(bank: Bank, clients: int) -> int:
    """Bytes the bank's servers and the point's clients may hold at once (the peak is
    a Restore, which holds two copies of the rows)."""
    # The shards' model, with the clients and this process counted as shard-sized processes.
    return RESTORE_COPIES * bank.raw_bytes + (bank.shards + clients + 1) * PROCESS_BYTES


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
