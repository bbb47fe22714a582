"""`instdisc scale fan-in`: how many GPUs does one shard carry? S shard processes
(``--shards``) driven by W simulated workers (``--workers``) on M simulated nodes
(``--nodes``), every worker paced at ``--rate`` steps/s, each with B updates and
lookups and K negatives per step; once with one Step per worker per step (aggregate
off) and once with one per node (on, through `trainer.node_steps`' packing and
splitting). A node is a process (`benchmarks.steps.run_step_clients`): off, its
workers are threads with a client each; on, one thread sends the node's Step for all.

Per point: the Steps each shard serves a second, a worker's Step p50/p99 (without the
node's gloo exchange, which a training run's round trip includes), and the busiest
shard's CPU per call, from which the capacity follows on paper: the GPUs one shard
carries at 80 % of a core, at ``--gpu-rate`` steps/s per GPU and W/M GPUs per node.
"""

from __future__ import annotations

import argparse
from contextlib import ExitStack
from pathlib import Path

from benchmarks.args import counts, positive_int
from benchmarks.report import plot_lines, write_table
from benchmarks.servers import cpu_seconds, start_shards
from benchmarks.steps import run_step_clients

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


def measure(a: argparse.Namespace, shards: int, aggregate: bool) -> dict:
    per_node = a.workers // a.nodes
    with ExitStack() as stack:
        servers = start_shards(stack, shards, a.rows, a.dim, a.dtype)
        before = [cpu_seconds(s.proc.pid) for s in servers]
        spec = ([s.address for s in servers], a.rows, a.dim, a.batch, a.negatives, a.nodes, a.seconds * a.rate)
        load = run_step_clients(*spec, workers=per_node, rate=a.rate, aggregate=aggregate)
        cpu = max(cpu_seconds(s.proc.pid) - b for s, b in zip(servers, before))  # the busiest shard's
    cpu_ms = 1e3 * cpu / (load["calls"] + load["warmup_calls"])  # every Step reaches every shard
    return {
        "shards": shards,
        "workers": a.workers,
        "nodes": a.nodes,
        "aggregate": "on" if aggregate else "off",
        "calls_per_s_per_shard": load["calls"] / load["seconds"],
        "step_p50_ms": load["step_p50_ms"],
        "step_p99_ms": load["step_p99_ms"],
        "shard_cpu_ms_per_call": cpu_ms,
        # GPUs behind one call: a node's when aggregated (fewer when its Step was split), else one.
        "gpus_per_shard": CORE_SHARE * 1e3 / cpu_ms / a.gpu_rate * load["steps"] / load["calls"],
    }


def run(a: argparse.Namespace) -> int:
    if a.workers % a.nodes:
        raise SystemExit(f"--workers ({a.workers}) must be a multiple of --nodes ({a.nodes})")
    output = Path(a.output_dir)
    rows = [measure(a, shards, aggregate) for shards in a.shards for aggregate in (False, True)]
    title = f"{a.workers} workers on {a.nodes} nodes"
    plots = [
        plot_lines(output / f"{y}.png", rows, "shards", y, "aggregate", title=title)
        for y in ("calls_per_s_per_shard", "step_p99_ms", "shard_cpu_ms_per_call", "gpus_per_shard")
    ]
    notes = [
        f"N={a.rows:,} D={a.dim} {a.dtype}, B={a.batch} and K={a.negatives} per worker, each at {a.rate} steps/s. "
        f"gpus_per_shard: the GPUs one shard carries at {CORE_SHARE:.0%} of a core, at {a.gpu_rate} steps/s "
        f"per GPU and {a.workers // a.nodes} GPUs per node (on paper, from its CPU per call)."
    ]
    write_table(rows, output, "Steps a shard serves, one per worker or one per node", notes, plots=plots)
    return 0
