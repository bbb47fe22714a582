"""`instdisc bank serve`: one shard behind gRPC, with health, reflection, auth and TLS.

The server starts NOT_SERVING, restores its newest snapshot (or initialises the
rows from the seed), and only then reports SERVING. On SIGTERM it stops taking
calls, lets in-flight ones finish, writes a final snapshot and exits 0.
"""

from __future__ import annotations

import hmac
import logging
import signal
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from bank_server.errors import NotFound
from bank_server.servicer import MemoryBankServicer, add_to_server
from bank_server.shard import Layout, Shard
from protos import bank_pb2

log = logging.getLogger(__name__)

SERVICE_NAME = bank_pb2.DESCRIPTOR.services_by_name["MemoryBank"].full_name
DEFAULT_MAX_MESSAGE_BYTES = 16 << 20
def limit_blas_threads(threads: int) -> None:
    """Cap numpy's BLAS pool for the rest of this process, whenever numpy was loaded
    (environment variables only work before it is: not in a Ray actor)."""
    from threadpoolctl import threadpool_limits

    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    threadpool_limits(limits=threads, user_api="blas")


def grpc_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Message-size options, set explicitly and identically on both ends."""
    return [("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes)]


@dataclass
class ServerConfig:
    shard_id: int
    num_shards: int
    rows: int
    dim: int = 128
    dtype: str = "float16"
    host: str = "127.0.0.1"
    port: int = 50051
    snapshot_dir: str | None = None
    keep_snapshots: int = 0      # newest snapshots kept per shard; 0 keeps all
    seed: int = 0
    token: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    workers: int = 8
    threads: int = 1             # numpy BLAS threads of a shard's own process (`instdisc bank serve --threads`)

    @property
    def layout(self) -> Layout:
        return Layout(self.shard_id, self.num_shards, self.rows, self.dim, self.dtype)


class _BearerToken(grpc.ServerInterceptor):
    """Rejects MemoryBank calls without ``authorization: Bearer <token>``.

    Health and reflection stay open: Kubernetes' native gRPC probes send no metadata.
    """

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token in 'authorization' metadata")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    def intercept_service(self, continuation, handler_call_details):
        if not handler_call_details.method.startswith(f"/{SERVICE_NAME}/"):
            return continuation(handler_call_details)
        sent = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(str(sent).encode(), self._expected):
            return continuation(handler_call_details)
        return self._deny


class BankServer:
    """One shard's gRPC server: ``start()`` binds and listens, ``load()`` brings the
    shard up, ``stop()`` drains and snapshots."""

    def __init__(self, config: ServerConfig):
        config.layout  # validates the layout before binding anything
        self.config = config
        interceptors = [_BearerToken(config.token)] if config.token else []
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="bank"),
            interceptors=interceptors, options=grpc_options(config.max_message_bytes))
        self.servicer = MemoryBankServicer(config.max_message_bytes, config.snapshot_dir, config.keep_snapshots)
        add_to_server(self.servicer, self._server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self._server)
        self._set_serving(False)
        address = f"{config.host}:{config.port}"
        if config.tls_cert:
            credentials = grpc.ssl_server_credentials(
                [(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())])
            self.port = self._server.add_secure_port(address, credentials)
        else:
            self.port = self._server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"could not bind {address}")

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    def _set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME):
            self.health.set(service, status)

    def start(self) -> "BankServer":
        self._server.start()
        return self

    def load(self) -> Shard:
        """Restore the newest snapshot, or initialise fresh rows; then report SERVING."""
        config = self.config
        shard = None
        if config.snapshot_dir:
            try:
                shard = Shard.restore(config.layout, config.snapshot_dir, seed=config.seed)
                log.info("restored shard %d from %s", config.shard_id, shard.restored_from)
            except NotFound:
                pass
        if shard is None:
            shard = Shard.create(config.layout, seed=config.seed)
        self.servicer.shard = shard
        self._set_serving(True)
        return shard

    def stop(self, grace: float = 10.0, final_snapshot: bool = True) -> None:
        self._set_serving(False)
        self._server.stop(grace).wait()
        shard = self.servicer.shard
        if final_snapshot and self.config.snapshot_dir and shard is not None:
            tag = f"shutdown-{time.strftime('%Y%m%dT%H%M%S')}-{time.time_ns() % 1_000_000_000:09d}"
            path, nbytes, seconds = shard.snapshot(self.config.snapshot_dir, tag, self.config.keep_snapshots)
            log.info("final snapshot %s: %d bytes in %.2fs", path, nbytes, seconds)

    def wait(self) -> None:
        self._server.wait_for_termination()


def serve(config: ServerConfig, grace: float = 10.0) -> int:
    """Run a shard until SIGTERM or SIGINT; return the exit status."""
    limit_blas_threads(config.threads)  # this process is the shard's own; an embedding host keeps its pool
    server = BankServer(config).start()
    # Print before loading so a supervisor sees the port while health says NOT_SERVING.
    print(f"instdisc bank shard {config.shard_id}/{config.num_shards} listening on {server.address}", flush=True)
    server.load()
    print(f"instdisc bank shard {config.shard_id}/{config.num_shards} SERVING "
          f"({config.layout.rows_held} rows x {config.dim} {config.dtype})", flush=True)
    stopping = threading.Event()

    def on_signal(signum, frame):
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stopping.wait()
    server.stop(grace)
    print(f"instdisc bank shard {config.shard_id} stopped", flush=True)
    return 0
