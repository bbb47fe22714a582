"""The trainer's side of the bank: the step schedule, and torch in and out.

`BankClient` speaks numpy; this module is the one place that turns tensors into
arrays and answers back into tensors: a step's positives and negatives on the training
device, `topk` and `partition_sums` on the CPU (the loss moves what it needs).

The schedule, stated here and only here. Batch t has indices I_t; the
step computes features F_t and pushes the update u(t) = (I_t, F_t). While step t
computes, ONE fused Step RPC per shard is in flight that

    applies u(t-1),  reads the rows v(I_{t+1}),  draws the K negatives of step t+1.

(Workers that share a node send theirs as one Step per shard: `trainer.node_steps`.)

So step t's positives were read after u(t-2) was applied and before u(t-1) (within an
epoch the batches are disjoint, so that lag never touches a batch's own rows), and the
update of the last step goes out when the batches run out.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch

from bank_server.client import BankClient, StepResult
from trainer.distributed import NodeGroup
from trainer.node_steps import NodeSteps

log = logging.getLogger(__name__)


class BankStep(NamedTuple):
    """What one training step needs from its batch and from the bank."""

    images: torch.Tensor  # (B, C, H, W) uint8, as the loader gave them
    indices: torch.Tensor  # (B,) global bank rows of the images
    positives: torch.Tensor  # (B, D) float32 bank rows of `indices`, on the device
    negatives: torch.Tensor  # (K, D) float32 uniform bank rows shared by the batch, on the device
    negative_indices: torch.Tensor  # (K,) their global rows, on the device (InfoNCE drops a query's own)
    waited_s: float  # how long this step was held up for the bank
    round_trip_s: float  # the RPC's own duration


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU numpy array of `t` (bfloat16 has no numpy type: it travels as float32)."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.cpu().numpy()


def rows_on(a: np.ndarray, device) -> torch.Tensor:
    """Bank rows as float32 on `device`. torch casts float16 with vector instructions,
    numpy at scalar speed (0.02 against 0.63 ms for 4,096 x 128 here). An answer that is
    a view of the received bytes is read-only and may sit at any offset, which torch
    does not take: numpy copies it first."""
    rows = a if a.flags.writeable and a.flags.aligned else np.array(a)
    return torch.from_numpy(rows).to(device=device, dtype=torch.float32)


class BankFeed:
    def __init__(
        self, client: BankClient, negatives: int, momentum: float, device: torch.device, node: NodeGroup | None = None
    ):
        """`node`: this worker's node's group when it shares its node and the node sends one Step."""
        self.client, self.negatives, self.momentum, self.device = client, negatives, momentum, device
        self._step = client.step if node is None else NodeSteps(client, node).step
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bank-feed")
        self._pending: Future | None = None
        self._pushed: tuple[np.ndarray, np.ndarray] | None = None

    # -- the schedule ------------------------------------------------------------

    def steps(self, batches: Iterable) -> Iterator[BankStep]:
        """Yield one `BankStep` per ``(images, indices, labels)`` batch. The caller
        must `push` each step's features before asking for the next step."""
        batches = iter(batches)
        current = next(batches, None)
        if current is None:
            return
        self._submit(None, current[1])
        while current is not None:
            upcoming = next(batches, None)
            answer, round_trip_s, waited_s = self._take()
            # Cast before the next RPC starts: torch's cast runs on both cores, and with the
            # feed's thread busy on one it waited for it (1.27 ms a cast, measured, for 0.02 ms
            # of work).
            images, indices, _ = current
            step = BankStep(
                images,
                indices,
                rows_on(answer.rows, self.device),
                rows_on(answer.negative_rows, self.device),
                torch.from_numpy(answer.negative_indices.astype(np.int64)).to(self.device),
                waited_s,
                round_trip_s,
            )
            update, self._pushed = self._pushed, None
            self._submit(update, None if upcoming is None else upcoming[1])  # in flight during this step
            yield step
            if self._pushed is None:
                raise RuntimeError("push() this step's features before the next step")
            current = upcoming
        self._take()
        update, self._pushed = self._pushed, None
        self._submit(update, None)  # the last step's update
        self._take()

    def push(self, indices: torch.Tensor, features: torch.Tensor) -> None:
        """This step's features for its rows; they go out with the next step's RPC."""
        self._pushed = (as_numpy(indices), as_numpy(features.float()))

    def _rpc(self, update, lookup) -> tuple[StepResult, float]:
        start = time.perf_counter()
        idx, features = update if update is not None else (None, None)
        result = self._step(
            update_indices=idx,
            update_features=features,
            momentum=self.momentum,
            lookup_indices=lookup,
            negatives=self.negatives if len(lookup) else 0,
        )
        return result, time.perf_counter() - start

    def _submit(self, update, lookup: torch.Tensor | None) -> None:
        lookup = np.empty(0, np.int64) if lookup is None else as_numpy(lookup)
        self._pending = self._pool.submit(self._rpc, update, lookup)

    def _take(self) -> tuple[StepResult, float, float]:
        """(answer, its round trip, how long the step waited for it)."""
        start = time.perf_counter()
        try:
            answer, round_trip_s = self._pending.result()
        finally:
            self._pending = None  # raised or not, it is taken: close() must not report it again
        return answer, round_trip_s, time.perf_counter() - start

    def close(self) -> None:
        """Wait for an RPC still in flight (a step that ended early); what it brings or
        raises is dropped, and the drop is logged."""
        try:
            if self._pending is not None:
                try:
                    self._pending.result()
                except Exception as error:
                    log.warning("dropped the bank's answer to an unfinished step: %s", error)
                self._pending = None
            if self._pushed is not None:
                log.warning(
                    "dropped the update of the last step (%d rows): training stopped before it was sent",
                    len(self._pushed[0]),
                )
                self._pushed = None
        finally:
            self._pool.shutdown()

    # -- torch face of the other calls ---------------------------------------------

    def write(self, indices: torch.Tensor, features: torch.Tensor) -> None:
        """Set rows to `features` outright (momentum 0): a warm start or a refresh."""
        self.client.update(as_numpy(indices), as_numpy(features.float()), momentum=0.0)

    def topk(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        sims, idx = self.client.topk(as_numpy(queries.float()), k)
        return torch.from_numpy(sims), torch.from_numpy(idx)

    def partition_sums(self, queries: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        log_z, expected = self.client.partition_sums(as_numpy(queries.float()), temperature)
        return torch.from_numpy(log_z), torch.from_numpy(expected)
