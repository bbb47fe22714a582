"""`instdisc bank serve`: one shard behind gRPC, with health, reflection, auth and TLS.

The server starts NOT_SERVING, recovers its shard (:mod:`bank_server.recovery`: the
snapshot LATEST names plus the update log after it, or rows from the seed), opens a new
log segment, and only then reports SERVING; a shard whose stored state cannot be read
refuses to start, saying which file and why. With a snapshot folder every update is
logged before its reply (`--fsync`), and `--snapshot-every` snapshots in the
background. On SIGTERM it stops taking calls, lets in-flight ones finish, writes a
final snapshot (none when a failed Restore left the shard damaged: LATEST and the log
then still hold its last good state) and exits 0.
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
from threadpoolctl import threadpool_limits

from bank_server.metrics import BankMetrics
from bank_server.protocol import DEFAULT_MAX_MESSAGE_BYTES, SERVICE_NAME, grpc_options
from bank_server.recovery import Recovery, open_logged
from bank_server.servicer import MemoryBankServicer, add_to_server
from bank_server.shard import PERIODIC_KEPT, Layout, Shard

log = logging.getLogger(__name__)


def limit_blas_threads(threads: int) -> None:
    """Cap numpy's BLAS pool for the rest of this process, whenever numpy was loaded
    (environment variables only work before it is: not in a Ray actor)."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    threadpool_limits(limits=threads, user_api="blas")


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
    keep_snapshots: int = 0  # newest snapshots kept per shard; 0 keeps all
    seed: int = 0
    token: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    workers: int = 8
    threads: int = 1  # numpy BLAS threads of a shard's own process (`instdisc bank serve --threads`)
    fsync: str = "everysec"  # the update log's: always | everysec | no (with a snapshot_dir)
    snapshot_every: float = 0  # seconds between periodic snapshots; 0: none
    allow_fresh: bool = False  # start from the seed when the stored state cannot be read
    fallback_snapshot: bool = False  # use the newest good snapshot the log continues when LATEST's is bad
    metrics_port: int = 0  # Prometheus metrics on this port; 0: none

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
        _ = config.layout  # validates the layout before binding anything
        self.config = config
        interceptors = [_BearerToken(config.token)] if config.token else []
        self.metrics = None
        if config.metrics_port:
            self.metrics = BankMetrics(self)
            interceptors.insert(0, self.metrics.interceptor)
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="bank"),
            interceptors=interceptors,
            options=grpc_options(config.max_message_bytes),
        )
        self.servicer = MemoryBankServicer(config.max_message_bytes, config.snapshot_dir, config.keep_snapshots)
        self.servicer.set_serving = self._set_serving
        self.recovery: Recovery | None = None
        self._stopping = threading.Event()
        self._periodic: threading.Thread | None = None
        add_to_server(self.servicer, self._server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self._server,
        )
        self._set_serving(False)
        address = f"{config.host}:{config.port}"
        if config.tls_cert:
            credentials = grpc.ssl_server_credentials(
                [(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())]
            )
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

    def start(self) -> BankServer:
        self._server.start()
        if self.metrics is not None:
            self.metrics_port = self.metrics.serve(self.config.host, self.config.metrics_port)
        return self

    def load(self) -> Shard:
        """Recover the shard (or initialise fresh rows without a snapshot folder), open
        its update log, then report SERVING. RecoveryRefused if its stored state cannot
        be read (see bank_server.recovery)."""
        config = self.config
        if not config.snapshot_dir:
            shard = Shard.create(config.layout, seed=config.seed)
        else:
            shard, self.recovery = open_logged(
                config.layout,
                config.snapshot_dir,
                config.seed,
                config.fsync,
                allow_fresh=config.allow_fresh,
                fallback=config.fallback_snapshot,
            )
            log.info(
                "shard %d %s; logging updates to %s (fsync %s)",
                config.shard_id,
                self.recovery.describe(),
                shard.log.path,
                config.fsync,
            )
        self.servicer.shard = shard
        if config.snapshot_dir and config.snapshot_every > 0:
            self._periodic = threading.Thread(
                target=self._snapshot_periodically, name="periodic-snapshots", daemon=True
            )
            self._periodic.start()
        self._set_serving(True)
        return shard

    def _snapshot_periodically(self) -> None:
        """``periodic-<unix time>`` every `snapshot_every` seconds, pruned among
        themselves; a failure is logged and tried again next time."""
        while not self._stopping.wait(self.config.snapshot_every):
            tag = f"periodic-{int(time.time())}"
            if self.servicer.shard.damaged:
                log.error(
                    "skipping periodic snapshot %s: the shard is damaged (%s); restart it to recover from "
                    "LATEST and its update log",
                    tag,
                    self.servicer.shard.damaged,
                )
                self._set_serving(False)
                continue
            try:
                path, nbytes, seconds = self.servicer.shard.snapshot(
                    self.config.snapshot_dir, tag, self.config.keep_snapshots, PERIODIC_KEPT
                )
                log.info("periodic snapshot %s: %d bytes in %.2fs", path, nbytes, seconds)
            except Exception:  # the shard serves on; its log still holds every update
                log.exception("periodic snapshot %s failed", tag)

    def stop(self, grace: float = 10.0, final_snapshot: bool = True) -> None:
        self._set_serving(False)
        self._stopping.set()
        self._server.stop(grace).wait()
        if self._periodic is not None:
            self._periodic.join()
        shard = self.servicer.shard
        try:
            if final_snapshot and self.config.snapshot_dir and shard is not None and shard.damaged:
                # Its rows are half a Restore: a snapshot of them would move LATEST off the
                # state the log and LATEST still hold. The next start recovers that state.
                log.error(
                    "no final snapshot: the shard is damaged (%s); LATEST and the update log are left as "
                    "they are, and the next start recovers from them",
                    shard.damaged,
                )
            elif final_snapshot and self.config.snapshot_dir and shard is not None:
                tag = f"shutdown-{time.strftime('%Y%m%dT%H%M%S')}-{time.time_ns() % 1_000_000_000:09d}"
                path, nbytes, seconds = shard.snapshot(self.config.snapshot_dir, tag, self.config.keep_snapshots)
                log.info("final snapshot %s: %d bytes in %.2fs", path, nbytes, seconds)
        finally:
            if shard is not None and shard.log is not None:
                shard.log.close()
            if self.metrics is not None:
                self.metrics.close()

    def wait(self) -> None:
        self._server.wait_for_termination()


def serve(config: ServerConfig, grace: float = 10.0) -> int:
    """Run a shard until SIGTERM or SIGINT; return the exit status."""
    limit_blas_threads(config.threads)  # this process is the shard's own; an embedding host keeps its pool
    server = BankServer(config).start()
    # Print before loading so a supervisor sees the port while health says NOT_SERVING.
    print(f"instdisc bank shard {config.shard_id}/{config.num_shards} listening on {server.address}", flush=True)
    server.load()
    print(
        f"instdisc bank shard {config.shard_id}/{config.num_shards} SERVING "
        f"({config.layout.rows_held} rows x {config.dim} {config.dtype})",
        flush=True,
    )
    stopping = threading.Event()

    def on_signal(signum, frame):
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stopping.wait()
    server.stop(grace)
    print(f"instdisc bank shard {config.shard_id} stopped", flush=True)
    return 0
