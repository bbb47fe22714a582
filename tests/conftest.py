"""Shared fixtures: real bank servers on loopback port 0, in this process or as
separate processes, and a plain numpy reference of the whole bank."""

from __future__ import annotations

import os
import time
from contextlib import ExitStack

import numpy as np
import pytest

from bank_server.client import BankClient
from bank_server.server import BankServer, ServerConfig
from bank_server.shard import Layout, initial_rows
from tests.processes import ServerProcess

# Every Ray the tests start (here and in child processes) binds loopback: on Linux Ray
# otherwise swaps 127.0.0.1 for the machine's network address.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def reference_bank(num_shards: int, rows: int, dim: int, dtype: str = "float32", seed: int = 0) -> np.ndarray:
    """The whole bank (N, D) as the shards initialise it, assembled by global index."""
    bank = np.empty((rows, dim), dtype=dtype)
    for s in range(num_shards):
        bank[s::num_shards] = initial_rows(Layout(s, num_shards, rows, dim, dtype), seed)
    return bank


class Bank:
    """In-process shard servers (real gRPC on loopback) and a client over them."""

    def __init__(self, num_shards, rows, dim, dtype="float32", seed=0, port=0, hosts=None, **config):
        hosts = hosts or ["127.0.0.1"] * num_shards
        self.servers = [
            BankServer(
                ServerConfig(
                    shard_id=s,
                    num_shards=num_shards,
                    rows=rows,
                    dim=dim,
                    dtype=dtype,
                    host=hosts[s],
                    port=port,
                    seed=seed,
                    **config,
                )
            ).start()
            for s in range(num_shards)
        ]
        for server in self.servers:
            server.load()
        self.addresses = [s.address for s in self.servers]

    def client(self, **kwargs) -> BankClient:
        return BankClient(self.addresses, **kwargs)

    def stop(self):
        for server in self.servers:
            server.stop(grace=0, final_snapshot=False)


@pytest.fixture
def make_bank():
    banks = []

    def make(*args, **kwargs) -> Bank:
        banks.append(Bank(*args, **kwargs))
        return banks[-1]

    yield make
    for bank in banks:
        bank.stop()


@pytest.fixture
def spawn_server():
    """Start ``python -m bank_server ARGS...``; returns once it says where it listens
    (``.wait_serving(timeout)`` waits for its rows). Killed at the end of the test."""
    with ExitStack() as stack:

        def spawn(*args: str) -> ServerProcess:
            return stack.enter_context(ServerProcess(["-m", "bank_server", *args]))

        yield spawn


def wait_until(predicate, timeout=30.0, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def free_port() -> int:
    """A loopback port free now (for programs that cannot be told to pick port 0)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
