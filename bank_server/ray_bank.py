"""The bank as Ray actors: each shard is a named actor running the same gRPC server.

Actors restart forever (``max_restarts=-1``); the constructor restores the newest
snapshot before the server reports SERVING, and binds the same port as before, so
a ``BankClient`` rides through a restart by retrying UNAVAILABLE. Actors take no
whole CPU by default: on a 2-core machine the train workers need both.
"""

from __future__ import annotations

import logging
import socket
import tempfile
from dataclasses import dataclass, replace

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from bank_server.client import BankClient
from bank_server.server import BankServer, ServerConfig

log = logging.getLogger(__name__)


class BankShardActor:
    def __init__(self, config: ServerConfig):
        self._server = BankServer(config).start()
        self._server.load()

    def address(self) -> str:
        return self._server.address

    def stop(self, final_snapshot: bool = True) -> None:
        self._server.stop(grace=5.0, final_snapshot=final_snapshot)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class BankHandle:
    actors: list
    names: list[str]
    addresses: list[str]
    snapshot_dir: str
    token: str | None = None

    def client(self, **kwargs) -> BankClient:
        return BankClient(self.addresses, token=self.token, **kwargs)

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
               token: str | None = None, name: str = "instdisc-bank", namespace: str | None = None,
               num_cpus: float = 0, memory: int | None = None, keep_snapshots: int = 0) -> BankHandle:
    """Start `num_shards` named shard actors on this node and wait until they serve.

    `host` is the bind address; with ``0.0.0.0`` the handle advertises this node's IP.
    Without `snapshot_dir` a temporary one is made, so restarts still restore.
    """
    snapshot_dir = snapshot_dir or tempfile.mkdtemp(prefix="instdisc-bank-")
    node_id = ray.get_runtime_context().get_node_id()
    advertised = ray.util.get_node_ip_address() if host in ("0.0.0.0", "::") else host
    actor_class = ray.remote(BankShardActor)
    # numpy's BLAS would otherwise start a spinning thread per core in every shard; with
    # shards and train workers sharing a few cores that oversubscription costs ~2x.
    threads = str(max(1, int(num_cpus)))
    options = dict(max_restarts=-1, max_task_retries=-1, num_cpus=num_cpus,
                   scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
                   runtime_env={"env_vars": {"OMP_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads,
                                             "MKL_NUM_THREADS": threads}})
    if memory:
        options["memory"] = memory
    if namespace:
        options["namespace"] = namespace
    base = ServerConfig(shard_id=0, num_shards=num_shards, rows=rows, dim=dim, dtype=dtype, host=host,
                        snapshot_dir=snapshot_dir, keep_snapshots=keep_snapshots, seed=seed, token=token)
    actors, names, addresses = [], [], []
    for shard_id in range(num_shards):
        config = replace(base, shard_id=shard_id, port=_free_port(host))
        actor_name = f"{name}-{shard_id}"
        actors.append(actor_class.options(name=actor_name, **options).remote(config))
        names.append(actor_name)
        addresses.append(f"{advertised}:{config.port}")
    ray.get([actor.address.remote() for actor in actors])  # constructors done: serving
    return BankHandle(actors, names, addresses, snapshot_dir, token)
