"""The bank as Ray actors: each shard is a named actor running the same gRPC server.

Actors restart forever (``max_restarts=-1``); the constructor restores the newest
snapshot before the server reports SERVING. Each start binds a port of its own
choosing (port 0), so a restart never waits for, or fights over, the port it had:
the named actor says where it serves now, and a ``BankClient`` built with
:func:`resolver` asks it whenever a shard stops answering. Actors take no whole CPU
by default: on a 2-core machine the train workers need both.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, replace

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from bank_server.client import BankClient
from bank_server.server import BankServer, ServerConfig

log = logging.getLogger(__name__)

# Shard actors live in their own namespace, so any process of the cluster (the
# driver, a train worker) finds them by name.
NAMESPACE = "instdisc-bank"


class BankShardActor:
    def __init__(self, config: ServerConfig):
        self._server = BankServer(config).start()
        self._server.load()
        host = config.host
        self._advertised = ray.util.get_node_ip_address() if host in ("0.0.0.0", "::") else host

    def address(self) -> str:
        """Where this incarnation serves: another port (or node) after a restart."""
        return f"{self._advertised}:{self._server.port}"

    def pid(self) -> int:
        return os.getpid()

    def stop(self, final_snapshot: bool = True) -> None:
        self._server.stop(grace=5.0, final_snapshot=final_snapshot)


def resolver(names: list[str]):
    """``resolve(shard, timeout_s) -> address`` for a BankClient: asks the shard's named
    actor where it serves now (waiting while Ray restarts it)."""

    def resolve(shard: int, timeout_s: float) -> str:
        actor = ray.get_actor(names[shard], namespace=NAMESPACE)
        return ray.get(actor.address.remote(), timeout=timeout_s)

    return resolve


@dataclass
class BankHandle:
    actors: list
    names: list[str]
    addresses: list[str]
    snapshot_dir: str
    token: str | None = None

    def client(self, **kwargs) -> BankClient:
        return BankClient(self.addresses, token=self.token, resolve=resolver(self.names), **kwargs)

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


def start_bank(num_shards: int, rows: int, dim: int = 128, dtype: str = "float16", *,
               snapshot_dir: str | None = None, seed: int = 0, host: str = "127.0.0.1",
               token: str | None = None, name: str = "instdisc-bank", num_cpus: float = 0,
               memory: int | None = None, keep_snapshots: int = 0, threads: int = 1) -> BankHandle:
    """Start `num_shards` named shard actors on this node and wait until they serve.

    `host` is the bind address; with ``0.0.0.0`` a shard advertises its node's IP.
    Without `snapshot_dir` a temporary one is made, so restarts still restore.
    `threads` caps each shard's numpy BLAS pool (`instdisc bank serve --threads`).
    """
    snapshot_dir = snapshot_dir or tempfile.mkdtemp(prefix="instdisc-bank-")
    node_id = ray.get_runtime_context().get_node_id()
    actor_class = ray.remote(BankShardActor)
    options = dict(max_restarts=-1, max_task_retries=-1, num_cpus=num_cpus, namespace=NAMESPACE,
                   scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
    if memory:
        options["memory"] = memory
    base = ServerConfig(shard_id=0, num_shards=num_shards, rows=rows, dim=dim, dtype=dtype, host=host, port=0,
                        snapshot_dir=snapshot_dir, keep_snapshots=keep_snapshots, seed=seed, token=token,
                        threads=threads)
    names = [f"{name}-{shard_id}" for shard_id in range(num_shards)]
    actors = [actor_class.options(name=actor_name, **options).remote(replace(base, shard_id=shard_id))
              for shard_id, actor_name in enumerate(names)]
    addresses = ray.get([actor.address.remote() for actor in actors])  # constructors done: serving
    return BankHandle(actors, names, addresses, snapshot_dir, token)
