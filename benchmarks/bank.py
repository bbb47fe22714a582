"""`instdisc bench bank`: is the remote bank fast enough? A training step's bank round
trip measured three ways in one run, so that the ratios mean something on any machine:

- ``step``: ``BankClient.step`` against real shard servers (separate processes);
- ``echo``: a plain gRPC unary call per shard moving the same request and answer bytes
  with no work on the server (`benchmarks.echo`): the floor for any gRPC design;
- ``inprocess``: the same update, lookup and sample on ``Shard`` objects in this process:
  the floor with no serialisation and no network.

Step and echo take turns call by call, so whatever else the machine does hits both
alike. How many Steps a second a shard serves to many workers: `instdisc scale fan-in`.
"""

from __future__ import annotations

import argparse
import json
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from bank_server.client import BankClient
from bank_server.shard import Layout, Shard
from benchmarks.args import counts, positive_int
from benchmarks.echo import EchoCalls
from benchmarks.servers import Server, start_shards
from benchmarks.steps import MOMENTUM, StepWorkload, percentile_ms, step_bytes, timed_calls


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for flag, default in (("--rows", 10**6), ("--dim", 128), ("--negatives", 4096), ("--batch", 256), ("--iters", 300)):
        parser.add_argument(flag, type=positive_int, default=default)
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    parser.add_argument("--shards", type=counts, default="1,2", help="comma-separated shard counts")
    parser.add_argument("--warmup", type=int, default=30)
    fsync = "the shards keep their update log in this mode, as deployed (default: no log)"
    parser.add_argument("--fsync", choices=("no", "everysec", "always"), help=fsync)
    parser.add_argument("--json", dest="json_path", help="also write the results here as a JSON list")


def inprocess_seconds(work: StepWorkload, a: argparse.Namespace, shards: int) -> list[float]:
    """The same update + lookup + sample on local Shard objects, routed by g % shards."""
    local = [Shard.create(Layout(s, shards, a.rows, a.dim, a.dtype)) for s in range(shards)]
    rng = np.random.default_rng(1)
    share = np.array([shard.layout.rows_held for shard in local]) / a.rows

    def step(i):
        done, reads = work.indices(i), work.indices(i + 1)
        for s, (shard, k) in enumerate(zip(local, rng.multinomial(a.negatives, share))):
            mine = done % shards == s
            shard.momentum_update(done[mine], work.features(i)[mine], MOMENTUM)
            shard.lookup(reads[reads % shards == s])
            if k:
                shard.sample(int(k))

    return timed_calls([step], a.iters, a.warmup)[0]


def measure(args: argparse.Namespace, shards: int) -> dict:
    work = StepWorkload(args.rows, args.dim, args.batch, seed=0)
    # Before the servers start, so that the in-process copies are freed by then.
    inprocess = inprocess_seconds(work, args, shards)
    sizes = step_bytes(args.batch, args.negatives, args.dim, args.dtype, shards)
    with ExitStack() as stack:
        servers = start_shards(stack, shards, args.rows, args.dim, args.dtype, args.fsync)
        client = stack.enter_context(BankClient([s.address for s in servers], timeout=120))
        echo_servers = [Server(["-m", "benchmarks.echo"]) for _ in range(shards)]
        for server in echo_servers:
            stack.callback(server.stop)
        echo = EchoCalls([e.address for e in echo_servers], sizes)
        stack.callback(echo.close)
        step, echoed = timed_calls([lambda i: work.step(client, i, args.negatives), echo], args.iters, args.warmup)
    result = {key: getattr(args, key) for key in ("rows", "dim", "dtype", "negatives", "batch", "iters", "fsync")}
    for name, seconds in (("step", step), ("echo", echoed), ("inprocess", inprocess)):
        result |= {f"{name}_p50_ms": percentile_ms(seconds, 50), f"{name}_p99_ms": percentile_ms(seconds, 99)}
    result["step_over_echo"] = result["step_p50_ms"] / result["echo_p50_ms"]
    result["step_over_inprocess"] = result["step_p50_ms"] / result["inprocess_p50_ms"]
    result["rows_per_s"] = (2 * args.batch + args.negatives) / float(np.mean(step))
    result |= dict(request_bytes=sum(s[0] for s in sizes), answer_bytes=sum(s[1] for s in sizes))
    return {"shards": shards, **result}


def run(args: argparse.Namespace) -> int:
    log = args.fsync or "none"
    print(f"bank Step: N={args.rows:,} D={args.dim} {args.dtype} K={args.negatives} B={args.batch}, update log: {log}")
    print("shards  step p50  step p99  echo p50  inproc p50  step/echo  step/inproc      rows/s", flush=True)
    results = []
    for shards in args.shards:
        r = measure(args, shards)
        results.append(r)
        print(
            f"{shards:>6} {r['step_p50_ms']:>7.2f}ms {r['step_p99_ms']:>7.2f}ms {r['echo_p50_ms']:>7.2f}ms "
            f"{r['inprocess_p50_ms']:>9.2f}ms {r['step_over_echo']:>10.2f} {r['step_over_inprocess']:>12.2f} "
            f"{r['rows_per_s']:>11,.0f}",
            flush=True,
        )
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(results, indent=2))
    return 0
