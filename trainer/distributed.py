"""The one module that knows about ranks and collectives (torch.distributed via Ray
Train). Everything degrades to a single process when no group is set up."""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _device() -> torch.device:
    """Where a collective's tensor must live: NCCL only takes CUDA tensors."""
    if "nccl" in str(dist.get_backend()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum of a list of numbers over all workers."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return t.tolist()


def all_gather_rows(rows: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
    """Every worker's `rows` (worker r holds counts[r] of them, same width and dtype),
    in rank order. Padded to the longest for the collective, trimmed after."""
    if not is_distributed():
        return [rows]
    padded = torch.zeros((max(counts), *rows.shape[1:]), dtype=rows.dtype, device=_device())
    padded[: len(rows)] = rows
    gathered = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(gathered, padded)
    return [share[:count] for share, count in zip(gathered, counts)]


def broadcast_object(obj, src: int = 0):
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    """Every worker's `obj` (picklable), in rank order."""
    if not is_distributed():
        return [obj]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


class StopTraining(RuntimeError):
    """A reason to end the run on every worker at once, without Ray's retries (a
    retry would meet the same problem)."""


def stop_if_any(error: Exception | None) -> None:
    """StopTraining on every worker, with the first (by rank) worker's `error` as its
    message, when any worker passes one. A collective: every worker calls it at the same
    point, so one worker's error does not leave the others waiting in the next one."""
    (failed,) = all_reduce_sum([float(error is not None)])
    if failed:
        messages = all_gather_object(None if error is None else str(error))
        raise StopTraining(next(m for m in messages if m is not None))


class NodeGroup:
    """The workers of one node as a gloo group, its first worker (`leader`) in the middle:
    `gather` brings every member's object to the leader, `scatter` hands each member
    its own. Called from any one thread of each member, in the same order on all."""

    def __init__(self, group, members: list[int]):
        self.group, self.members = group, members
        self.is_leader = rank() == members[0]

    def gather(self, obj) -> list | None:
        """Every member's `obj` in rank order at the leader; None elsewhere."""
        gathered = [None] * len(self.members) if self.is_leader else None
        dist.gather_object(obj, gathered, group=self.group, group_dst=0)
        return gathered

    def scatter(self, objs: list | None):
        """The leader's objs[i] to member i; each member gets its own."""
        mine = [None]
        dist.scatter_object_list(mine, objs, group=self.group, group_src=0)
        return mine[0]


def node_group(node: str) -> NodeGroup | None:
    """This worker's node's group (`node`: the id of the node it runs on), or None when
    it is alone there. A collective over all workers: each makes
    every node's group (gloo, whatever the training backend), in the same order."""
    if not is_distributed():
        return None
    nodes = all_gather_object(node)
    members = [[r for r, n in enumerate(nodes) if n == m] for m in sorted(set(nodes))]
    group, _ = dist.new_subgroups_by_enumeration(members, backend="gloo")
    mine = next(m for m in members if rank() in m)
    if rank() == 0:
        log.info(f"bank: one Step per node per shard; workers per node: {[len(m) for m in members]}")
    return NodeGroup(group, mine) if len(mine) > 1 else None
