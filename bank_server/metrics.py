"""A shard's Prometheus metrics (`instdisc bank serve --metrics-port`), on a registry of
its own, so several servers can live in one process (the tests, a benchmark).

Per MemoryBank RPC, from a gRPC server interceptor: calls, errors by status code, and
latency. From the shard, read at each scrape: rows held, updates applied, update-log
bytes, fsyncs, fsync lag (seconds that written log records have waited for an fsync; 0 when
none wait), the last snapshot's age and duration.
"""

from __future__ import annotations

import time

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from bank_server.protocol import SERVICE_NAME

# Step's p50 is about a millisecond on loopback; a Snapshot or Restore takes seconds.
_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60)


class BankMetrics:
    def __init__(self, server):
        self._server = server
        self._prefix = f"/{SERVICE_NAME}/"
        self.registry = CollectorRegistry()
        self.calls = Counter("instdisc_bank_calls", "MemoryBank calls", ["method"], registry=self.registry)
        self.errors = Counter(
            "instdisc_bank_errors",
            "MemoryBank calls that ended with an error status",
            ["method", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "instdisc_bank_call_seconds",
            "MemoryBank call latency on the server",
            ["method"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_ShardCollector(server))
        self.interceptor = _Interceptor(self)
        self._http = None

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics on `host`:`port`; returns the port."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _Interceptor(grpc.ServerInterceptor):
    def __init__(self, metrics: BankMetrics):
        self._metrics = metrics

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        name = handler_call_details.method
        if handler is None or handler.unary_unary is None or not name.startswith(self._metrics._prefix):
            return handler
        method = name[len(self._metrics._prefix) :]
        inner, metrics = handler.unary_unary, self._metrics

        def measured(request, context):
            start = time.perf_counter()
            try:
                return inner(request, context)
            except Exception:
                if context.code() is None:  # raised without a status: gRPC answers UNKNOWN
                    metrics.errors.labels(method, "UNKNOWN").inc()
                raise
            finally:
                metrics.latency.labels(method).observe(time.perf_counter() - start)
                metrics.calls.labels(method).inc()
                code = context.code()
                if code is not None and code != grpc.StatusCode.OK:
                    metrics.errors.labels(method, code.name).inc()

        return grpc.unary_unary_rpc_method_handler(
            measured, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )


class _ShardCollector:
    """The shard's own numbers, read when Prometheus scrapes."""

    def __init__(self, server):
        self._server = server

    def collect(self):
        shard = self._server.servicer.shard
        if shard is None:  # still loading
            return
        yield GaugeMetricFamily("instdisc_bank_rows_held", "rows this shard holds", value=shard.layout.rows_held)
        # A gauge: a Restore sets it back to the snapshot's count.
        yield GaugeMetricFamily(
            "instdisc_bank_updates_applied",
            "updates applied (replayed ones included; a Restore sets it to the restored snapshot's count)",
            value=shard.updates_applied,
        )
        log = shard.log
        if log is not None:
            yield CounterMetricFamily(
                "instdisc_bank_log_bytes", "bytes appended to the update log since the start", value=log.bytes_written
            )
            yield CounterMetricFamily(
                "instdisc_bank_log_fsyncs",
                "fsyncs of the update log since the start (with "
                "--fsync always, one covers every call written before it)",
                value=log.fsyncs,
            )
            yield GaugeMetricFamily(
                "instdisc_bank_fsync_lag_seconds",
                "seconds written update-log records have waited for an fsync (0: none wait)",
                value=log.fsync_lag(),
            )
        if shard.last_snapshot_time is not None:
            yield GaugeMetricFamily(
                "instdisc_bank_snapshot_age_seconds",
                "seconds since the last snapshot ended",
                value=time.time() - shard.last_snapshot_time,
            )
            yield GaugeMetricFamily(
                "instdisc_bank_snapshot_duration_seconds",
                "the last snapshot's duration",
                value=shard.last_snapshot_seconds,
            )
