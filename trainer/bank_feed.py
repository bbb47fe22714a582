"""The bank side of a training step, one step ahead of the accelerator.

Step t's fused RPC (DESIGN.md, "One training step") applies step t-1's momentum
update, reads the bank rows of batch t+1 and draws the next K negatives. With
``overlap`` it runs on a background thread while step t computes, so the worker
waits only for whatever part of the round trip outlasts the compute.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from bank_server.client import BankClient


class BankFeed:
    def __init__(self, client: BankClient, negatives: int, momentum: float, device: torch.device,
                 overlap: bool = True):
        self.client, self.negatives, self.momentum, self.device = client, negatives, momentum, device
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bank-feed") if overlap else None
        self._pending: Future | None = None
        self.round_trip_s = 0.0  # last RPC's duration
        self.wait_s = 0.0        # how long the step was held up for the last answer
        self._blocked_s = 0.0

    def _rpc(self, update, lookup):
        start = time.perf_counter()
        idx, features = update if update is not None else (None, None)
        result = self.client.step(update_indices=idx, update_features=features, momentum=self.momentum,
                                  lookup_indices=lookup, negatives=self.negatives)
        return result, time.perf_counter() - start

    def submit(self, update: tuple[torch.Tensor, torch.Tensor] | None, lookup: torch.Tensor | None) -> None:
        """Send the update (indices, features) of the step just computed and ask for
        the rows of the batch after the next one. Runs in the background with overlap."""
        if self._pending is not None:
            raise RuntimeError("take() the previous answer before submitting again")
        update = None if update is None else (update[0].cpu(), update[1].detach().float().cpu())
        # An empty tensor rather than None, so every answer comes back as torch.
        lookup = torch.empty(0, dtype=torch.long) if lookup is None else lookup.cpu()
        if self._pool is None:
            done: Future = Future()
            done.set_result(self._rpc(update, lookup))
            self._pending = done
            self._blocked_s = done.result()[1]  # the whole round trip held the step up
        else:
            self._pending = self._pool.submit(self._rpc, update, lookup)

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(positive rows, negative rows) from the last submit, as float32 on the device."""
        start = time.perf_counter()
        result, self.round_trip_s = self._pending.result()
        self._pending = None
        self.wait_s = time.perf_counter() - start + self._blocked_s
        self._blocked_s = 0.0
        positives = result.rows.to(self.device, torch.float32, non_blocking=True)
        negatives = result.negative_rows.to(self.device, torch.float32, non_blocking=True)
        return positives, negatives

    def drain(self) -> None:
        """Wait for anything in flight (its answer is dropped)."""
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def close(self) -> None:
        try:
            self.drain()
        finally:
            if self._pool is not None:
                self._pool.shutdown()
