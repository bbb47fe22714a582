"""One Step per node per shard: the workers on a node send their bank Steps as one.

Without this every worker sends its own Step to every shard (`trainer.bank_feed`), and
a shard serves W calls per training step whatever the number of shards. Here the
node's first worker, the leader, gathers the node's L requests over the node's gloo
group (`trainer.distributed.NodeGroup`), sends them as one Step per shard through its
`BankClient`, and hands each worker its part of the answer:

- updates are concatenated and applied once each, before the reads, as a worker's own
  Step applies its own;
- lookups are concatenated, and each worker gets its rows back in its order;
- L*K negatives are drawn, and worker i takes places [i*K, (i+1)*K): every place is an
  independent uniform row of the bank (`bank_server.client.negative_places`), so each
  block is K i.i.d. uniform rows of that worker's own.

Requests whose update rows collide (a padded last batch), whose momentum differs, that
together would draw more negatives than the bank has rows (a Step's limit), or that
together would not fit in one message go in consecutive Steps, in rank order (the
last is logged once: larger shard messages would avoid it). Each worker checks its own request first with the shards'
validators, so a bad one raises the same `InvalidArgument` as its own Step would, on
that worker alone, and adds nothing to the node's Step. An error of the node's Step
(after the client's retries inside its deadline) is raised on every worker of the node.
The leader's client sees and reports the shards' outages.

What it costs: per step a gather of the node's requests and a scatter of its answers
(pickled, over gloo on loopback: a handful of small collectives and the rows' bytes),
run by the feed's thread while the step computes, and a worker's round trip then
includes waiting for the node's slowest worker to send its request. A worker alone on
its node does not use this at all (`BankFeed` calls its client directly). Each worker's
`StepResult.updates_applied` counts the shards that applied the node's update.
"""

from __future__ import annotations

import logging
import pickle
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from bank_server.client import BankClient, StepResult
from bank_server.protocol import step_message_bytes

if TYPE_CHECKING:  # torch's import is the workers' business, not a benchmark's client processes'
    from trainer.distributed import NodeGroup

log = logging.getLogger(__name__)


class StepRequest(NamedTuple):
    """One worker's Step, checked: arrays, possibly empty."""

    update_indices: np.ndarray  # (u,) int64
    update_features: np.ndarray  # (u, D)
    momentum: float
    lookup_indices: np.ndarray  # (l,) int64
    negatives: int


def pack(requests: list[StepRequest], max_bytes: int, dim: int, dtype, max_draws: int) -> list[list[int]]:
    """Positions of `requests`, in order, grouped into the Steps that carry them: a
    request joins the group before it unless its update rows collide with the group's
    (a Step's update holds each row once), its momentum differs, the group's Step would
    not fit in `max_bytes`, or it would draw more than `max_draws` negatives (a Step
    draws at most the bank's rows)."""
    groups: list[list[int]] = []
    rows: set[int] = set()
    sizes = np.zeros(3, np.int64)  # updates, lookups, negatives of the open group
    for i, r in enumerate(requests):
        own = np.array([len(r.update_indices), len(r.lookup_indices), r.negatives])
        joined = sizes + own
        fits = step_message_bytes(*(int(n) for n in joined), dim, dtype) <= max_bytes and joined[2] <= max_draws
        same_momentum = not groups or requests[groups[-1][0]].momentum == r.momentum
        new_rows = r.update_indices.tolist()
        if groups and fits and same_momentum and rows.isdisjoint(new_rows):
            groups[-1].append(i)
            sizes = joined
        else:
            groups.append([i])
            rows, sizes = set(), own
        rows.update(new_rows)
    return groups


def send_all(client: BankClient, requests: list[StepRequest]) -> tuple[list[StepResult], int]:
    """Each request's part of the answers to the fewest Steps that carry them all
    (`pack`), and how many Steps that was."""
    answers: list[StepResult] = []
    groups = pack(requests, client.max_message_bytes, client.dim, client.dtype, client.rows)
    for group in groups:
        answers += _send(client, [requests[i] for i in group])
    return answers, len(groups)


def _send(client: BankClient, requests: list[StepRequest]) -> list[StepResult]:
    updates = [r for r in requests if len(r.update_indices)]
    result = client.step(
        update_indices=np.concatenate([r.update_indices for r in updates]) if updates else None,
        update_features=np.concatenate([r.update_features for r in updates]) if updates else None,
        momentum=requests[0].momentum,
        lookup_indices=np.concatenate([r.lookup_indices for r in requests]),
        negatives=sum(r.negatives for r in requests),
    )
    parts, row, place = [], 0, 0
    for r in requests:
        lookups, negatives = len(r.lookup_indices), r.negatives
        parts.append(
            StepResult(
                result.rows[row : row + lookups],
                result.negative_indices[place : place + negatives],
                result.negative_rows[place : place + negatives],
                result.updates_applied if len(r.update_indices) else 0,
            )
        )
        row, place = row + lookups, place + negatives
    return parts


class NodeSteps:
    """`BankClient.step` for a worker that shares its node: the same call and answer,
    one Step per node per shard on the wire."""

    def __init__(self, client: BankClient, node: NodeGroup):
        self.client, self.node = client, node
        self._warned = False

    def step(self, update_indices=None, update_features=None, momentum=0.5, lookup_indices=None, negatives=0):
        # Whatever happens, every member gathers and scatters once: a worker that raised
        # before its part would leave its node waiting in the collective.
        mistake = request = None
        try:
            request = self._checked(update_indices, update_features, momentum, lookup_indices, negatives)
        except Exception as error:
            mistake = error  # sent as nothing: the node's other workers get their answers
        requests = self.node.gather(request)
        answers = self._send_all(requests) if self.node.is_leader else None
        answer = self.node.scatter(answers)
        if mistake is not None:
            raise mistake
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def _checked(self, update_indices, update_features, momentum, lookup_indices, negatives) -> StepRequest:
        """The request as arrays, checked whole as the shards check theirs (same messages)."""
        c = self.client
        idx, features, reads = c.checked_step(
            update_indices, update_features, momentum, lookup_indices, negatives, whole=True
        )
        return StepRequest(
            np.empty(0, np.int64) if idx is None else idx,
            np.empty((0, c.dim), np.float32) if features is None else features,
            float(momentum),
            np.empty(0, np.int64) if reads is None else reads,
            int(negatives),
        )

    def _send_all(self, requests: list[StepRequest | None]) -> list:
        """Each member's StepResult (None for one that sent nothing), or the error every
        member raises, in a form that crosses the group."""
        try:
            present = [i for i, r in enumerate(requests) if r is not None]
            parts, steps = send_all(self.client, [requests[i] for i in present])
            if steps > 1 and not self._warned:
                self._warn_if_too_large([requests[i] for i in present], steps)
            answers: list = [None] * len(requests)
            for i, part in zip(present, parts):
                answers[i] = part
            return answers
        except Exception as error:  # the node's Step failed: every worker raises it, as its own would have
            return [_portable(error)] * len(requests)

    def _warn_if_too_large(self, requests: list[StepRequest], steps: int) -> None:
        """Log once when the node's Step was split for the message limit (a split for
        overlapping rows is expected, and rare)."""
        c = self.client
        sizes = [sum(len(r.update_indices) for r in requests), sum(len(r.lookup_indices) for r in requests)]
        need = step_message_bytes(*sizes, sum(r.negatives for r in requests), c.dim, c.dtype)
        if need > c.max_message_bytes:
            self._warned = True
            log.warning(
                f"this node's workers' Steps went out as {steps} Steps, not one: together they may need {need} "
                f"bytes, over the bank's message limit of {c.max_message_bytes}; start the shards with "
                f"--max-message-mb {-(-need // (1 << 20))} or more"
            )


def _portable(error: Exception) -> Exception:
    """`error`, or a RuntimeError saying what it was when it cannot be pickled to the
    other members."""
    try:
        pickle.dumps(error)
        return error
    except Exception:  # noqa: BLE001 -- any failure to pickle: the message still goes
        return RuntimeError(f"{type(error).__name__}: {error}")
