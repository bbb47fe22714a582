"""`instdisc scale fan-in`: how many GPUs does one shard carry? S shard processes
(``--shards``) driven by W simulated workers (``--workers``) on M simulated nodes
(``--nodes``), every worker paced at ``--rate`` steps/s, each with B updates and
lookups and K negatives per step; once with one Step per worker per step (aggregate
off) and once with one per node (on, through `trainer.node_steps`' packing and
splitting). A node is a process: off, its workers are threads with a client each; on,
one thread sends the node's Step for all of them.

Per point: the Steps each shard serves a second, a worker's Step p50/p99 (without the
node's gloo exchange, which a training run's round trip includes), and the busiest
shard's CPU per call, from which the capacity follows on paper: the GPUs one shard
carries at 80 % of a core, at ``--gpu-rate`` steps/s per GPU and W/M GPUs per node.
"""

from __future__ import annotations

import argparse
import multiprocessing
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from bank_server.client import BankClient
from benchmarks.args import counts, positive_int
from benchmarks.report import plot_lines, write_table
from benchmarks.servers import cpu_seconds, start_shards
from benchmarks.steps import MOMENTUM, StepWorkload, percentile_ms
from trainer.node_steps import StepRequest, send_all

_TIMEOUT_S = 300.0
CORE_SHARE = 0.8  # of a shard's core the capacity allows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", type=counts, default="1,2,4", help="comma-separated shard counts")
    for flag, default, what in (
        ("--workers", 32, "simulated train workers (GPUs)"),
        ("--nodes", 4, "simulated nodes the workers are spread over"),
        ("--rate", 5, "Steps a second each worker makes"),
        ("--seconds", 10, "timed seconds per point"),
        ("--gpu-rate", 75, "steps a second of one GPU, for the capacity on paper"),
        ("--rows", 10**6, "N"),
        ("--dim", 128, "D"),
        ("--batch", 32, "B per worker"),
        ("--negatives", 4096, "K per worker"),
    ):
        parser.add_argument(flag, type=positive_int, default=default, help=f"{what} (default {default})")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    parser.add_argument("--output-dir", default="runs/scale-fan-in")


def _node(addresses, a, node: int, aggregate: bool, ready, answers) -> None:
    """One node's workers, paced from a common start; puts (latencies, Steps sent)."""
    try:
        workers = a.workers // a.nodes
        work = StepWorkload(a.rows, a.dim, a.batch, seed=node)
        clients = [BankClient(addresses, timeout=_TIMEOUT_S) for _ in range(1 if aggregate else workers)]
        steps, warmup = int(a.seconds * a.rate), 3
        latencies: list[float] = []  # list.extend holds the GIL: the threads share it safely
        sent = [0] * (1 if aggregate else workers)  # Steps sent, per thread

        def request(w: int, i: int) -> StepRequest:
            at = w * 7919 + i  # each worker its own batches
            return StepRequest(work.indices(at), work.features(at), MOMENTUM, work.indices(at + 1), a.negatives)

        def paced(start: float, thread: int, body) -> None:
            for i in range(-warmup, steps):
                time.sleep(max(0.0, start + i / a.rate - time.monotonic()))
                began = time.perf_counter()
                calls = body(i)
                if i >= 0:
                    latencies.extend([time.perf_counter() - began] * (workers if aggregate else 1))
                    sent[thread] += calls

        def one_worker(w: int, start: float) -> None:
            paced(start, w, lambda i: (clients[w].step(*request(w, i)), 1)[1])

        ready.wait()
        start = time.monotonic() + warmup / a.rate
        if aggregate:
            paced(start, 0, lambda i: send_all(clients[0], [request(w, i) for w in range(workers)])[1])
        else:
            threads = [threading.Thread(target=one_worker, args=(w, start)) for w in range(workers)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        for client in clients:
            client.close()
        answers.put((latencies, sum(sent)))
    except BaseException:
        ready.abort()
        answers.put(None)
        raise


def measure(a: argparse.Namespace, shards: int, aggregate: bool) -> dict:
    context = multiprocessing.get_context("spawn")
    with ExitStack() as stack:
        servers = start_shards(stack, shards, a.rows, a.dim, a.dtype)
        addresses = [s.address for s in servers]
        ready, answers = context.Barrier(a.nodes + 1, timeout=_TIMEOUT_S), context.Queue()
        procs = [
            context.Process(target=_node, args=(addresses, a, n, aggregate, ready, answers), daemon=True)
            for n in range(a.nodes)
        ]
        for proc in procs:
            proc.start()
        ready.wait()
        before, began = [cpu_seconds(s.proc.pid) for s in servers], time.monotonic()
        got = [answers.get(timeout=_TIMEOUT_S) for _ in procs]
        wall = time.monotonic() - began
        cpu = max(cpu_seconds(s.proc.pid) - b for s, b in zip(servers, before))
        for proc in procs:
            proc.join(30)
    if None in got:
        raise RuntimeError("a simulated node failed; its traceback is above")
    latencies = np.concatenate([np.asarray(seconds) for seconds, _ in got])
    calls = sum(sent for _, sent in got)  # every Step reaches every shard
    cpu_ms = 1e3 * cpu / calls  # includes the warm-up's few calls: a slight overestimate
    per_node = a.workers // a.nodes if aggregate else 1  # GPUs behind one call
    return {
        "shards": shards,
        "workers": a.workers,
        "nodes": a.nodes,
        "aggregate": "on" if aggregate else "off",
        "calls_per_s_per_shard": calls / wall,
        "step_p50_ms": percentile_ms(latencies, 50),
        "step_p99_ms": percentile_ms(latencies, 99),
        "shard_cpu_ms_per_call": cpu_ms,
        "shard_core_share": cpu / wall,
        "gpus_per_shard": CORE_SHARE * 1e3 / cpu_ms / a.gpu_rate * per_node,
    }


def run(a: argparse.Namespace) -> int:
    if a.workers % a.nodes:
        raise SystemExit(f"--workers ({a.workers}) must be a multiple of --nodes ({a.nodes})")
    output = Path(a.output_dir)
    rows = []
    for shards in a.shards:
        for aggregate in (False, True):
            rows.append(measure(a, shards, aggregate))
            print(rows[-1], flush=True)
    plots = [
        plot_lines(output / f"{y}.png", rows, "shards", y, "aggregate", title=f"{a.workers} workers on {a.nodes} nodes")
        for y in ("calls_per_s_per_shard", "step_p99_ms", "shard_cpu_ms_per_call")
    ]
    notes = [
        f"N={a.rows:,} D={a.dim} {a.dtype}, B={a.batch} and K={a.negatives} per worker, each at {a.rate} steps/s. "
        f"gpus_per_shard: the GPUs one shard carries at {CORE_SHARE:.0%} of a core, at {a.gpu_rate} steps/s "
        f"per GPU and {a.workers // a.nodes} GPUs per node (on paper, from its CPU per call)."
    ]
    write_table(rows, output, "Steps a shard serves, one per worker or one per node", notes, plots=plots)
    return 0
