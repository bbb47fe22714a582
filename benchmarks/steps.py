"""What a training step asks of the bank, replayed: batches of distinct rows with unit
features, timed Step loops, Step clients in processes of their own (threads would share
one GIL and flatten a throughput-vs-clients curve), and the bytes a Step moves."""

from __future__ import annotations

import multiprocessing
import queue
import threading
import time
from collections.abc import Callable

import numpy as np

from bank_server.client import BankClient
from protos import bank_pb2

MOMENTUM = 0.5  # the bank's update v <- normalize(m v + (1 - m) f), the paper's m
_TIMEOUT_S = 600.0  # a client's start, its calls and any one call
_WIRE = {"float16": bank_pb2.FLOAT16, "float32": bank_pb2.FLOAT32, "int64": bank_pb2.INT64}


class StepWorkload:
    """A cycle of batches, each `batch` distinct rows in [0, rows) and `batch` unit
    float32 features of `dim`, drawn up front from `seed` so that a timed loop only
    calls the bank. Step i updates batch i and reads batch i + 1, as training does."""

    def __init__(self, rows: int, dim: int, batch: int, seed: int, count: int = 64):
        if not 1 <= batch <= rows:
            raise ValueError(f"the batch ({batch}) must be between 1 and the rows ({rows})")
        rng = np.random.default_rng(seed)
        self._indices = [rng.choice(rows, batch, replace=False) for _ in range(count)]
        f = rng.standard_normal((count, batch, dim), dtype=np.float32)
        self._features = f / np.linalg.norm(f, axis=2, keepdims=True)

    def indices(self, i: int) -> np.ndarray:
        return self._indices[i % len(self._indices)]

    def features(self, i: int) -> np.ndarray:
        return self._features[i % len(self._features)]

    def step(self, client: BankClient, i: int, negatives: int) -> None:
        client.step(self.indices(i), self.features(i), MOMENTUM, self.indices(i + 1), negatives)


def timed_calls(fns: list[Callable[[int], object]], iters: int, warmup: int) -> list[list[float]]:
    """Per function of `fns`, the seconds of each of `iters` calls fn(i) after `warmup`
    untimed ones; with several, they take turns call by call, who goes first alternating,
    so that whatever else the machine does hits them alike."""
    seconds: list[list[float]] = [[] for _ in fns]
    for i in range(warmup + iters):
        for k in range(len(fns)) if i % 2 == 0 else reversed(range(len(fns))):
            start = time.perf_counter()
            fns[k](i)
            if i >= warmup:
                seconds[k].append(time.perf_counter() - start)
    return seconds


def percentile_ms(seconds, q: float) -> float:
    return float(np.percentile(seconds, q)) * 1e3


def warmup_calls(iters: int) -> int:
    """Untimed calls before `iters` timed ones: enough for connections and caches."""
    return max(3, iters // 10)


def step_bytes(batch: int, negatives: int, dim: int, dtype: str, shards: int) -> list[tuple[int, int]]:
    """(request, answer) bytes of each shard's Step as protobuf encodes them: float32
    features in, rows in the bank's `dtype` out, the batch and the negatives split over
    the shards as evenly as `g % shards` splits them."""

    def tensor(dtype: str, *shape: int) -> bank_pb2.Tensor:
        return bank_pb2.Tensor(dtype=_WIRE[dtype], shape=shape, data=bytes(np.empty(shape, dtype).nbytes))

    sizes = []
    for s in range(shards):
        b, k = len(range(s, batch, shards)), len(range(s, negatives, shards))
        update = dict(indices=tensor("int64", b), features=tensor("float32", b, dim), momentum=MOMENTUM)
        update = bank_pb2.UpdateRequest(**update, client_id="0" * 32, sequence=1)  # as long as a client's
        request = bank_pb2.StepRequest(update=update, lookup_indices=tensor("int64", b), sample_k=k)
        answer = dict(rows=tensor(dtype, b, dim), sample_indices=tensor("int64", k), sample_rows=tensor(dtype, k, dim))
        answer = bank_pb2.StepResponse(update_applied=True, **answer)
        sizes.append((request.ByteSize(), answer.ByteSize()))
    return sizes


def _client(spec: tuple, seed: int, ready, answers) -> None:
    """One client process: `workers` simulated workers, each making `iters` timed Steps
    after `warmup_calls(iters)` untimed ones, free-running or paced at `rate` a second;
    with `aggregate` their Steps go out as one (`trainer.node_steps.send_all`), as a
    node's do. Puts (latencies, start, end, timed Steps sent, warm-up Steps sent)."""
    from trainer.node_steps import StepRequest, send_all

    addresses, rows, dim, batch, negatives, iters, workers, rate, aggregate = spec
    try:
        work = StepWorkload(rows, dim, batch, seed)
        clients = [BankClient(addresses, timeout=_TIMEOUT_S) for _ in range(1 if aggregate else workers)]

        def request(w: int, i: int) -> StepRequest:
            at = w * 7919 + i  # each worker its own batches
            return StepRequest(work.indices(at), work.features(at), MOMENTUM, work.indices(at + 1), negatives)

        def one(w: int, i: int) -> int:
            clients[w].step(*request(w, i))
            return 1

        bodies = [lambda i: send_all(clients[0], [request(w, i) for w in range(workers)])[1]]
        if not aggregate:
            bodies = [lambda i, w=w: one(w, i) for w in range(workers)]
        warm = sum(body(i) for body in bodies for i in range(warmup_calls(iters)))
        latencies, sent, errors = [], [0] * len(bodies), []  # list.extend holds the GIL: threads share them

        def loop(k: int, start: float) -> None:
            try:
                for i in range(iters):
                    if rate:
                        time.sleep(max(0.0, start + i / rate - time.monotonic()))
                    began = time.perf_counter()
                    sent[k] += bodies[k](i)
                    latencies.extend([time.perf_counter() - began] * (workers if aggregate else 1))
            except Exception as error:  # raised in the process's own thread below
                errors.append(error)

        ready.wait()
        start = time.monotonic()
        threads = [threading.Thread(target=loop, args=(k, start)) for k in range(1, len(bodies))]
        for thread in threads:
            thread.start()
        loop(0, start)
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        answers.put((latencies, start, time.monotonic(), sum(sent), warm))
        for client in clients:
            client.close()
    except BaseException:
        ready.abort()  # the others stop waiting for this one
        answers.put(None)
        raise


def run_step_clients(
    addresses: list[str],
    rows: int,
    dim: int,
    batch: int,
    negatives: int,
    clients: int,
    iters: int,
    workers: int = 1,
    rate: float | None = None,
    aggregate: bool = False,
):
    """`clients` processes of `workers` simulated workers each (`_client`) that make
    Steps on the bank at `addresses`, all starting their `iters` timed ones together:
    the latency a worker sees over all their Steps, their aggregate throughput, and the
    Steps sent (each reaches every shard that has a part of it)."""
    context = multiprocessing.get_context("spawn")  # the caller may hold threads (gRPC's) that fork would copy
    ready, answers = context.Barrier(clients + 1, timeout=_TIMEOUT_S), context.Queue()
    spec = (addresses, rows, dim, batch, negatives, iters, workers, rate, aggregate)
    procs = [context.Process(target=_client, args=(spec, s, ready, answers), daemon=True) for s in range(clients)]
    for proc in procs:
        proc.start()
    try:
        ready.wait()
        got = [answers.get(timeout=_TIMEOUT_S) for _ in procs]
        if None in got:
            raise threading.BrokenBarrierError
    except (threading.BrokenBarrierError, queue.Empty):
        codes = [p.exitcode for p in procs]
        raise RuntimeError(f"a Step client failed or stalled (exit codes {codes}); its traceback is above") from None
    finally:
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
    latencies = np.concatenate([seconds for seconds, *_ in got])
    wall = max(end for _, _, end, *_ in got) - min(start for _, start, *_ in got)
    result = dict(step_p50_ms=percentile_ms(latencies, 50), step_p99_ms=percentile_ms(latencies, 99), seconds=wall)
    result |= dict(steps=len(latencies), steps_per_s=len(latencies) / wall)
    result |= dict(calls=sum(g[3] for g in got), warmup_calls=sum(g[4] for g in got))
    return result | {"rows_per_s": result["steps_per_s"] * (2 * batch + negatives)}
