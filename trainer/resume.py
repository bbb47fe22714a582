"""A run's state at a checkpointed step, and the way back to it: the model checkpoint
(`trainer.checkpoint`'s format) and the bank snapshot of the same step, which a resume
restores together. Ray Train keeps the checkpoint folders; the shards keep the
snapshots."""

from __future__ import annotations

import logging
import tempfile

from bank_server.client import BankClient, BankRpcError
from trainer import checkpoint
from trainer import distributed as dist

log = logging.getLogger(__name__)


class CannotResume(RuntimeError):
    """The checkpoint cannot be resumed; the message says why and what to do. Raised on
    every worker at once: what decides it is the same everywhere, or broadcast."""


def snapshot_tag(epoch: int, step: int) -> str:
    return f"epoch-{epoch:04d}-step-{step}"


def checkpoint_name(epoch: int, step: int) -> str:
    """The checkpoint folder's name: the names sort as the steps do."""
    return f"epoch-{epoch:04d}-step-{step:08d}"


def save(client: BankClient, state: dict) -> str | None:
    """Rank 0 snapshots the bank, then writes the checkpoint of the same step (every field
    of `checkpoint.save` but ``bank_snapshot`` and ``bank_addresses``) into a new
    temporary folder, which it returns; other workers return None. Call it when every
    worker has finished the step (after a barrier)."""
    if dist.rank() != 0:
        return None
    tag = snapshot_tag(state["epoch"], state["step"])
    client.snapshot(tag)
    folder = tempfile.mkdtemp(prefix="instdisc-ckpt-")
    checkpoint.save(folder, **state, bank_snapshot=tag, bank_addresses=client.addresses)
    return folder


def restore(folder: str, client: BankClient, reading: dict, device, node_local: bool = False) -> dict:
    """The checkpoint in `folder` (on `device`), once its bank snapshot is restored: rank
    0 restores it and every worker learns the outcome. CannotResume when the checkpoint
    was trained on another dataset than `reading` (this run's fingerprint) or the bank
    cannot restore the snapshot; `node_local`: the snapshots are on each shard's node
    (bank.snapshot_dir with a $VARIABLE), which the message then explains."""
    state = checkpoint.load(folder, map_location=device)
    trained_on = state.get("dataset")
    if trained_on is not None and trained_on["sha256"] != reading["sha256"]:  # absent from older checkpoints
        raise CannotResume(
            f"cannot resume: the checkpoint at epoch {state['epoch']} was trained on another dataset "
            f"({dataset_words(trained_on)}) than this run reads ({dataset_words(reading)}); resume "
            "with the same data.* or start a new run (another --name or --output-dir)"
        )
    problem = None
    if dist.rank() == 0:
        try:
            client.restore(state["bank_snapshot"])
        except BankRpcError as error:
            problem = (
                f"cannot resume: the checkpoint at epoch {state['epoch']} needs bank snapshot "
                f"{state['bank_snapshot']!r}, which the bank could not restore ({error})"
            )
            if node_local:
                problem += (
                    "; bank.snapshot_dir is on each node's own disk, so a shard placed on another node than "
                    "before (a node gone, or a plan that changed) finds no snapshot there: resume on the same "
                    "nodes, or keep the bank on storage every node sees"
                )
    problem = dist.broadcast_object(problem)
    if problem:
        raise CannotResume(problem)
    log.info(f"resumed at epoch {state['epoch']}, step {state['step']}, bank snapshot {state['bank_snapshot']!r}")
    return state


def dataset_words(fingerprint: dict) -> str:
    return ", ".join(f"{key} {value}" for key, value in fingerprint.items())
