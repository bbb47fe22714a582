"""`instdisc bench bank`: the training step's bank round trip, measured three ways in
one run so the ratios mean something on any machine:

- ``step``: ``BankClient.step`` against real shard servers (separate processes);
- ``inprocess``: the same update + lookup + sample on ``Shard`` objects in this process
  (the floor: no serialisation, no network);
- ``echo``: a raw gRPC unary call per shard moving the same request and answer bytes
  with no work on the server (the floor for any gRPC design).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import struct
import subprocess
import sys
import time
from concurrent import futures
from contextlib import ExitStack

import grpc
import numpy as np

from bank_server import tensors
from bank_server.client import BankClient
from bank_server.server import grpc_options
from bank_server.shard import Layout, Shard
from protos import bank_pb2

_ECHO_METHOD = "/instdisc.bench.Echo/Echo"
_MAX_MESSAGE = 64 << 20


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", type=float, default=1e6)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    parser.add_argument("--shards", default="1,2", help="comma-separated shard counts")
    parser.add_argument("--negatives", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--json", dest="json_path", help="also write the results here as a JSON list")


# -- processes ------------------------------------------------------------------

def _spawn(args: list[str], stack: ExitStack) -> str:
    """Start a server process that prints 'listening on HOST:PORT'; return the address."""
    # One BLAS thread per server, as the Ray actors run: spinning BLAS threads from
    # several processes on a few cores would measure oversubscription, not the bank.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=env)

    def stop():
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()

    stack.callback(stop)
    for line in proc.stdout:
        found = re.search(r"listening on (\S+)", line)
        if found:
            return found.group(1)
    raise RuntimeError(f"{args} exited with {proc.wait()} before listening")


def echo_server_main() -> None:
    """A gRPC server whose one method answers N zero bytes, N read from the request's
    first 8 bytes; the request body is ignored (it only has to cross the wire)."""
    cache: dict[int, bytes] = {}

    def echo(request: bytes, context) -> bytes:
        (size,) = struct.unpack_from("<q", request)
        if size not in cache:
            cache[size] = bytes(size)
        return cache[size]

    handler = grpc.method_handlers_generic_handler(
        "instdisc.bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=grpc_options(_MAX_MESSAGE))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"listening on 127.0.0.1:{port}", flush=True)
    server.wait_for_termination()


# -- measurements ---------------------------------------------------------------

def _percentiles(seconds: list[float]) -> tuple[float, float]:
    ms = np.array(seconds) * 1e3
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def _timed_pair(first, second, iters: int, warmup: int) -> tuple[list[float], list[float]]:
    a, b = [], []
    for i in range(warmup + iters):
        start = time.perf_counter()
        first(i)
        middle = time.perf_counter()
        second(i)
        if i >= warmup:
            a.append(middle - start)
            b.append(time.perf_counter() - middle)
    return a, b


def timed_calls(fn, iters: int, warmup: int) -> list[float]:
    """Seconds of each of `iters` calls fn(i), after `warmup` untimed ones."""
    for i in range(warmup):
        fn(i)
    out = []
    for i in range(warmup, warmup + iters):
        start = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - start)
    return out


class _Workload:
    """Batches of distinct indices (an epoch's permutation) and unit features."""

    def __init__(self, rows: int, dim: int, batch: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.order = rng.permutation(rows)
        self.batch = batch
        f = rng.standard_normal((64, batch, dim)).astype(np.float32)
        self.features = f / np.linalg.norm(f, axis=2, keepdims=True)

    def indices(self, i: int) -> np.ndarray:
        begin = (i * self.batch) % (len(self.order) - self.batch)
        return self.order[begin:begin + self.batch]

    def feature(self, i: int) -> np.ndarray:
        return self.features[i % len(self.features)]


def _measure(rows, dim, dtype, shards, negatives, batch, iters, warmup) -> dict:
    work = _Workload(rows, dim, batch)
    layouts = [Layout(s, shards, rows, dim, dtype) for s in range(shards)]

    # In-process: the same update + lookup + sample, routed to local Shard objects.
    local = [Shard.create(layout) for layout in layouts]
    rng = np.random.default_rng(1)
    share_p = np.array([layout.rows_held for layout in layouts]) / rows

    def inprocess(i):
        prev, nxt, f = work.indices(i), work.indices(i + 1), work.feature(i)
        shares = rng.multinomial(negatives, share_p)
        for s, shard in enumerate(local):
            up, look = prev % shards == s, nxt % shards == s
            shard.step((prev[up], f[up], 0.5, "bench", i), nxt[look], int(shares[s]))

    inprocess_s = timed_calls(inprocess, iters, warmup)
    local.clear()  # free the bank copies before the servers start

    with ExitStack() as stack:
        addresses = [_spawn(["-m", "bank_server", "--shard-id", str(s), "--num-shards", str(shards),
                             "--rows", str(rows), "--dim", str(dim), "--dtype", dtype, "--port", "0"], stack)
                     for s in range(shards)]
        client = stack.enter_context(BankClient(addresses, timeout=120))

        def step(i):
            client.step(work.indices(i), work.feature(i), 0.5, work.indices(i + 1), negatives)

        # The echo moves each shard's real request and answer sizes.
        sizes = [(0, 0)] * shards
        for s in range(shards):
            per_batch, per_k = batch // shards, negatives // shards
            request = bank_pb2.StepRequest(
                update=bank_pb2.UpdateRequest(
                    indices=tensors.encode(np.zeros(per_batch, np.int64)),
                    features=tensors.encode(np.zeros((per_batch, dim), np.float32)), momentum=0.5,
                    client_id=client.client_id, sequence=1),
                lookup_indices=tensors.encode(np.zeros(per_batch, np.int64)), sample_k=per_k)
            answer = bank_pb2.StepResponse(
                update_applied=True, rows=tensors.encode(np.zeros((per_batch, dim), dtype)),
                sample_indices=tensors.encode(np.zeros(per_k, np.int64)),
                sample_rows=tensors.encode(np.zeros((per_k, dim), dtype)))
            sizes[s] = (request.ByteSize(), answer.ByteSize())
        echo_addresses = [_spawn(["-c", "from bank_server.bench import echo_server_main; echo_server_main()"], stack)
                          for _ in range(shards)]
        channels = [grpc.insecure_channel(a, options=grpc_options(_MAX_MESSAGE)) for a in echo_addresses]
        for c in channels:
            stack.callback(c.close)
        calls = [c.unary_unary(_ECHO_METHOD) for c in channels]
        payloads = [struct.pack("<q", answer) + bytes(request - 8) for request, answer in sizes]

        def echo(i):
            if len(calls) == 1:
                calls[0](payloads[0], timeout=60)
                return
            pending = [call.future(p, timeout=60) for call, p in zip(calls, payloads)]
            for p in pending:
                p.result()

        # Alternate the two so that whatever else the machine does hits both alike.
        step_s, echo_s = _timed_pair(step, echo, iters, warmup)

    step_p50, step_p99 = _percentiles(step_s)
    echo_p50, echo_p99 = _percentiles(echo_s)
    inproc_p50, inproc_p99 = _percentiles(inprocess_s)
    rows_per_step = 2 * batch + negatives
    return {
        "shards": shards, "rows": rows, "dim": dim, "dtype": dtype, "negatives": negatives, "batch": batch,
        "iters": iters,
        "step_p50_ms": step_p50, "step_p99_ms": step_p99,
        "echo_p50_ms": echo_p50, "echo_p99_ms": echo_p99,
        "inprocess_p50_ms": inproc_p50, "inprocess_p99_ms": inproc_p99,
        "step_over_echo": step_p50 / echo_p50, "step_over_inprocess": step_p50 / inproc_p50,
        "rows_per_s": rows_per_step / (float(np.mean(step_s))),
        "request_bytes": sum(s[0] for s in sizes), "answer_bytes": sum(s[1] for s in sizes),
    }


def run_bench(args: argparse.Namespace) -> int:
    rows = int(args.rows)
    results = []
    print(f"bank Step benchmark: N={rows:,} D={args.dim} {args.dtype} K={args.negatives} B={args.batch} "
          f"iters={args.iters}", flush=True)
    header = f"{'shards':>6} {'step p50':>9} {'step p99':>9} {'echo p50':>9} {'inproc p50':>10} {'step/echo':>9} {'rows/s':>12}"
    print(header)
    for shards in (int(s) for s in args.shards.split(",")):
        r = _measure(rows, args.dim, args.dtype, shards, args.negatives, args.batch, args.iters, args.warmup)
        results.append(r)
        print(f"{shards:>6} {r['step_p50_ms']:>7.2f}ms {r['step_p99_ms']:>7.2f}ms {r['echo_p50_ms']:>7.2f}ms "
              f"{r['inprocess_p50_ms']:>8.2f}ms {r['step_over_echo']:>9.2f} {r['rows_per_s']:>12,.0f}", flush=True)
    if args.json_path:
        with open(args.json_path, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0
