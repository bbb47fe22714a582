"""The bank as Ray actors: each shard is a named actor running the same gRPC server.

Placement. The shards are dealt out over the cluster's
nodes before anything starts (:func:`plan_placement`): each shard reserves the memory
it will hold (Ray's ``memory`` resource: its rows once, as a Restore reads into the live
rows, a snapshot block, plus the process: ``shard.memory_bytes``), they go one per node
while nodes last, and a bank that does not fit is refused up front with what each node
would need and has. Each shard is then
pinned to its node (hard node affinity), for two reasons: Ray's own SPREAD strategy
would restart a crashed shard on any node, away from the snapshots on its node's disk;
and a node that is gone makes its shards fail loudly rather than come back empty
elsewhere.

Ray's ``memory`` resource is bookkeeping: it keeps the scheduler from overcommitting a
node, but it limits nothing, and Ray's memory monitor kills retriable workers (a shard
with ``max_restarts=-1`` is one) when the host runs low. What protects a shard is the
reservation (nothing else of ours lands where it does not fit) and its snapshot: killed,
it restarts on its node from its newest snapshot.

Restarts. Actors restart forever; the constructor recovers the shard (its snapshot and
update log) before the server reports SERVING. A shard whose stored state cannot be read
does not serve: its constructor raises :class:`ShardRefused`, which Ray does not retry
(an actor whose constructor raises is dead), so `start_bank` fails with the reason, and
a client asking for a dead shard's address logs it at each retry until its deadline.
Each start binds a port of its own choosing (port 0) on its node's address, so a
restart never waits for, or fights over, the port it had: the named actor says where
it serves now, and a ``BankClient`` built with :func:`resolver`
asks it whenever a shard stops answering. Actors take no whole CPU by default: on a
2-core machine the train workers need both.

The bearer token never travels through Ray. An actor's constructor arguments are kept in
Ray's control store (the GCS, and Redis with GCS fault tolerance) for its restarts, and
so is a ``runtime_env``'s ``env_vars``; so a shard is told where to read the token on its
node, never the token: ``token_file`` (a path every shard's node has, such as a mounted
Secret) or ``token_env`` (the name of an environment variable the node's Ray processes
inherit: a local Ray started by a driver that has it, or a Ray pod's env from a Secret).
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from dataclasses import dataclass, replace

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from bank_server.client import BankClient
from bank_server.protocol import DEFAULT_MAX_MESSAGE_BYTES
from bank_server.recovery import RecoveryRefused
from bank_server.server import BankServer, ServerConfig, limit_blas_threads
from bank_server.shard import PROCESS_BYTES, memory_bytes, rows_on_shard
from bank_server.token_source import BankTokenMissing, read_token

log = logging.getLogger(__name__)

_VARIABLE = re.compile(r"\$(\w+)|\$\{(\w+)\}")  # $NAME or ${NAME}, as os.path.expandvars reads them
GIB = 1 << 30


class BankDoesNotFit(RuntimeError):
    """The cluster's free memory cannot hold the bank; the message gives the numbers."""


class BankDidNotStart(RuntimeError):
    """A shard actor failed in its constructor, or did not serve in time."""


class ShardRefused(RuntimeError):
    """A shard's snapshot folder holds state it cannot read: it refuses to serve rather
    than come back empty. Raised in the actor's constructor, so Ray does not restart it."""


def plan_placement(needs: list[int], free: dict[str, int]) -> list[str]:
    """The node of each shard (the biggest shards first): among the nodes it fits on, the
    one holding the fewest shards so far, then the one with the most memory free. Shards
    spread one per node while nodes last, and share a node only when they must. `free`
    maps node ids to free bytes; BankDoesNotFit, with every node's numbers, if a shard
    fits nowhere."""
    left, count = dict(free), dict.fromkeys(free, 0)
    placed: list[str | None] = [None] * len(needs)
    for shard in sorted(range(len(needs)), key=lambda s: -needs[s]):
        fits = [n for n in left if left[n] >= needs[shard]]
        if not fits:
            nodes = "; ".join(f"node {n[:12]}: {free[n] / GIB:.2f} GiB free" for n in sorted(free))
            raise BankDoesNotFit(
                f"the bank does not fit in the cluster's memory: {len(needs)} shard(s) need "
                f"{', '.join(f'{n / GIB:.2f}' for n in needs)} GiB each (the rows and a snapshot block, plus "
                f"{PROCESS_BYTES >> 20} MiB per process), and the nodes have {nodes or 'none'}; add nodes or "
                "memory, or use bank.dtype=float16"
            )
        node = min(fits, key=lambda n: (count[n], -left[n], n))
        placed[shard] = node
        left[node] -= needs[shard]
        count[node] += 1
    return placed


def free_memory_by_node() -> dict[str, int]:
    """Ray's ``memory`` resource free on each alive node, in bytes."""
    try:
        from ray._private.state import available_resources_per_node

        free = available_resources_per_node()
    except (ImportError, AttributeError) as error:  # a private API: fall back to the totals, and say so
        log.warning("cannot read Ray's free memory per node (%s); planning the bank with each node's total", error)
        free = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    return {node: int(resources.get("memory", 0)) for node, resources in free.items()}


class BankShardActor:
    def __init__(self, config: ServerConfig, token_file: str | None = None, token_env: str | None = None):
        if config.token:
            raise ValueError(
                "a shard actor must not be given the token itself (Ray records constructor "
                "arguments): pass token_file or token_env"
            )
        where = ray.util.get_node_ip_address()
        try:
            token = read_token(token_file, token_env)
        except BankTokenMissing as error:  # on this node: say which
            raise BankTokenMissing(f"shard {config.shard_id} on {where}: {error}") from None
        limit_blas_threads(config.threads)  # this process is the shard's own
        node_ip = where
        # `$VAR`s in the snapshot folder are this node's: a node-local disk that each node
        # mounts under its own path serves this shard's restarts, which stay on its node.
        snapshot_dir = config.snapshot_dir
        if snapshot_dir:
            unset = [a or b for a, b in _VARIABLE.findall(snapshot_dir) if not os.environ.get(a or b)]
            if unset:
                raise ShardRefused(
                    f"shard {config.shard_id} on {where}: its snapshot folder {snapshot_dir!r} names "
                    f"{', '.join('$' + name for name in unset)}, which this node's Ray does not set"
                )
            snapshot_dir = os.path.expandvars(snapshot_dir)
        config = replace(config, token=token, snapshot_dir=snapshot_dir)
        if not config.host:  # the node's own address: reachable from the cluster, not every interface
            config = replace(config, host=node_ip)
        self._server = BankServer(config).start()
        try:
            self._server.load()
        except RecoveryRefused as error:
            self._server.stop(grace=0, final_snapshot=False)
            raise ShardRefused(str(error)) from None
        self._advertised = node_ip if config.host in ("0.0.0.0", "::") else config.host

    def address(self) -> str:
        """Where this incarnation serves: another port (or node) after a restart."""
        return f"{self._advertised}:{self._server.port}"

    def pid(self) -> int:
        return os.getpid()

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def stop(self, final_snapshot: bool = True) -> None:
        self._server.stop(grace=5.0, final_snapshot=final_snapshot)


def resolver(names: list[str]):
    """``resolve(shard, timeout_s) -> address`` for a BankClient: asks the shard's named
    actor where it serves now (waiting while Ray restarts it)."""

    def resolve(shard: int, timeout_s: float) -> str:
        # Named actors live in the job's namespace, which the train workers share.
        return ray.get(ray.get_actor(names[shard]).address.remote(), timeout=timeout_s)

    return resolve


@dataclass
class BankHandle:
    actors: list
    names: list[str]
    addresses: list[str]
    snapshot_dir: str
    token_file: str | None = None  # where the token is read (never the token: a handle may travel)
    token_env: str | None = None
    nodes: list[str] = ()  # the node each shard is pinned to
    memory: list[int] = ()  # the bytes each shard reserved

    def describe(self) -> list[str]:
        """One line per shard: where it runs and what it reserved."""
        return [
            f"shard {s}: node {node[:12]} at {address}, {memory / GIB:.2f} GiB reserved"
            for s, (node, address, memory) in enumerate(zip(self.nodes, self.addresses, self.memory))
        ]

    def client(self, **kwargs) -> BankClient:
        """A client with the token read here, from the same file or variable as the shards."""
        return BankClient(
            self.addresses, token=read_token(self.token_file, self.token_env), resolve=resolver(self.names), **kwargs
        )

    def stop(self, final_snapshot: bool = False) -> None:
        """Stop the servers (optionally writing a last snapshot) and end the actors,
        even when a server fails to stop cleanly (that is logged, not raised)."""
        try:
            ray.get([actor.stop.remote(final_snapshot) for actor in self.actors], timeout=120)
        except Exception as error:  # a dead actor or a failed snapshot must not hide the run's outcome
            log.warning("bank shards did not stop cleanly: %s", error)
        finally:
            for actor in self.actors:
                ray.kill(actor, no_restart=True)


def start_bank(
    num_shards: int,
    rows: int,
    dim: int = 128,
    dtype: str = "float16",
    *,
    snapshot_dir: str | None = None,
    seed: int = 0,
    host: str | None = None,
    token_file: str | None = None,
    token_env: str | None = None,
    name: str = "instdisc-bank",
    num_cpus: float = 0,
    keep_snapshots: int = 0,
    threads: int = 1,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    timeout: float = 600.0,
) -> BankHandle:
    """Start `num_shards` named shard actors, spread over the nodes by their free memory
    (:func:`plan_placement`), and wait until
    they serve (at most `timeout` seconds).

    `host` is the bind address; by default each shard binds its node's address (with
    ``0.0.0.0`` it binds every interface and advertises the node's address).
    `snapshot_dir` is where each shard snapshots, on its node: a shard restarts on its
    node, so a node-local path serves restarts; resuming a run (the placement is planned
    again, and may differ) needs a path every node sees. Environment variables in it
    (``$LOCAL_DISK/bank``) are expanded on each shard's node. Without it a temporary one
    is made, so restarts still restore.
    `threads` caps each shard's numpy BLAS pool (`instdisc bank serve --threads`).
    `max_message_bytes` is the shards' gRPC message limit (`protocol.message_limit`
    sizes it for a run's Steps).
    `token_file` / `token_env`: where each shard reads the bearer token on its node (a
    file path, or an environment variable's name); the token itself is never passed:
    Ray keeps actor arguments in its control store. This process reads it too, first,
    so a missing token fails here rather than in every shard.
    """
    read_token(token_file, token_env)  # fail fast, here, on a missing or empty one
    snapshot_dir = snapshot_dir or tempfile.mkdtemp(prefix="instdisc-bank-")
    needs = [memory_bytes(rows_on_shard(rows, num_shards, s), dim, dtype) for s in range(num_shards)]
    nodes = plan_placement(needs, free_memory_by_node())
    actor_class = ray.remote(BankShardActor)
    base = ServerConfig(
        shard_id=0,
        num_shards=num_shards,
        rows=rows,
        dim=dim,
        dtype=dtype,
        host=host or "",
        port=0,
        snapshot_dir=snapshot_dir,
        keep_snapshots=keep_snapshots,
        seed=seed,
        token=None,
        threads=threads,
        max_message_bytes=max_message_bytes,
    )
    names = [f"{name}-{shard_id}" for shard_id in range(num_shards)]
    actors = [
        actor_class.options(
            name=actor_name,
            max_restarts=-1,
            max_task_retries=-1,
            num_cpus=num_cpus,
            memory=needs[shard_id],
            scheduling_strategy=NodeAffinitySchedulingStrategy(nodes[shard_id], soft=False),
        ).remote(replace(base, shard_id=shard_id), token_file, token_env)
        for shard_id, actor_name in enumerate(names)
    ]
    try:
        addresses = ray.get([actor.address.remote() for actor in actors], timeout=timeout)  # constructors done
    except Exception as error:  # none of a half-started bank stays behind
        for actor in actors:
            ray.kill(actor, no_restart=True)
        if isinstance(error, ray.exceptions.GetTimeoutError):
            raise BankDidNotStart(
                f"the bank's {num_shards} shard(s) did not all serve within {timeout:g} s (a large "
                "snapshot to restore, or memory taken since the plan?)"
            ) from None
        raise BankDidNotStart(f"a bank shard failed to start: {error}") from error
    return BankHandle(actors, names, addresses, snapshot_dir, token_file, token_env, nodes, needs)
