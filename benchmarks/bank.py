"""`instdisc bench bank`: the training step's bank round trip, measured three ways in
one run so the ratios mean something on any machine:

- ``step``: ``BankClient.step`` against real shard servers (separate processes);
- ``inprocess``: the same update + lookup + sample on ``Shard`` objects in this process
  (the floor: no serialisation, no network);
- ``echo``: a raw gRPC unary call per shard moving the same request and answer bytes
  with no work on the server (the floor for any gRPC design, `benchmarks.echo`).
"""

from __future__ import annotations

import argparse
import json
from contextlib import ExitStack

import numpy as np

from bank_server.client import BankClient
from bank_server.shard import Layout, Shard
from benchmarks.args import comma_list, positive_int
from benchmarks.echo import EchoCalls
from benchmarks.processes import ServerProcess, start_bank
from benchmarks.timing import percentile_ms, timed_calls, timed_pair
from benchmarks.workload import MOMENTUM, StepWorkload, step_message_bytes


def _shard_counts(text: str) -> list[int]:
    return comma_list(text, positive_int)


def add_bench_bank_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", type=positive_int, default=10**6)
    parser.add_argument("--dim", type=positive_int, default=128)
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    parser.add_argument("--shards", type=_shard_counts, default="1,2", help="comma-separated shard counts")
    parser.add_argument("--negatives", type=positive_int, default=4096)
    parser.add_argument("--batch", type=positive_int, default=256)
    parser.add_argument("--iters", type=positive_int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--json", dest="json_path", help="also write the results here as a JSON list")


def _inprocess_seconds(work: StepWorkload, rows, dim, dtype, shards, negatives, iters, warmup) -> list[float]:
    """The same update + lookup + sample, routed to local Shard objects."""
    layouts = [Layout(s, shards, rows, dim, dtype) for s in range(shards)]
    local = [Shard.create(layout) for layout in layouts]
    rng = np.random.default_rng(1)
    share_p = np.array([layout.rows_held for layout in layouts]) / rows

    def inprocess(i):
        prev, nxt, f = work.indices(i), work.indices(i + 1), work.features(i)
        shares = rng.multinomial(negatives, share_p)
        for s, shard in enumerate(local):
            up, look = prev % shards == s, nxt % shards == s
            shard.step((prev[up], f[up], MOMENTUM, "bench", i), nxt[look], int(shares[s]))

    return timed_calls(inprocess, iters, warmup)


def _measure(rows, dim, dtype, shards, negatives, batch, iters, warmup) -> dict:
    work = StepWorkload(rows, dim, batch, seed=0)
    # Returns before the servers start, so the bank's in-process copies are freed by then.
    inprocess_s = _inprocess_seconds(work, rows, dim, dtype, shards, negatives, iters, warmup)
    sizes = step_message_bytes(batch, negatives, dim, dtype, shards)
    with ExitStack() as stack:
        servers = start_bank(stack, shards, rows, dim, dtype)
        client = stack.enter_context(BankClient([s.address for s in servers], timeout=120))
        echoes = [stack.enter_context(ServerProcess(["-m", "benchmarks.echo"])) for _ in range(shards)]
        echo = EchoCalls([e.address for e in echoes], sizes)
        stack.callback(echo.close)

        def step(i):
            client.step(work.indices(i), work.features(i), MOMENTUM, work.indices(i + 1), negatives)

        step_s, echo_s = timed_pair(step, echo, iters, warmup)

    step_p50, echo_p50, inproc_p50 = (percentile_ms(s, 50) for s in (step_s, echo_s, inprocess_s))
    return {
        "shards": shards, "rows": rows, "dim": dim, "dtype": dtype, "negatives": negatives, "batch": batch,
        "iters": iters,
        "step_p50_ms": step_p50, "step_p99_ms": percentile_ms(step_s, 99),
        "echo_p50_ms": echo_p50, "echo_p99_ms": percentile_ms(echo_s, 99),
        "inprocess_p50_ms": inproc_p50, "inprocess_p99_ms": percentile_ms(inprocess_s, 99),
        "step_over_echo": step_p50 / echo_p50, "step_over_inprocess": step_p50 / inproc_p50,
        "rows_per_s": (2 * batch + negatives) / float(np.mean(step_s)),
        "request_bytes": sum(s[0] for s in sizes), "answer_bytes": sum(s[1] for s in sizes),
    }


def run_bench_bank(args: argparse.Namespace) -> int:
    results = []
    print(f"bank Step benchmark: N={args.rows:,} D={args.dim} {args.dtype} K={args.negatives} B={args.batch} "
          f"iters={args.iters}", flush=True)
    print(f"{'shards':>6} {'step p50':>9} {'step p99':>9} {'echo p50':>9} {'inproc p50':>10} {'step/echo':>9} "
          f"{'rows/s':>12}")
    for shards in args.shards:
        r = _measure(args.rows, args.dim, args.dtype, shards, args.negatives, args.batch, args.iters, args.warmup)
        results.append(r)
        print(f"{shards:>6} {r['step_p50_ms']:>7.2f}ms {r['step_p99_ms']:>7.2f}ms {r['echo_p50_ms']:>7.2f}ms "
              f"{r['inprocess_p50_ms']:>8.2f}ms {r['step_over_echo']:>9.2f} {r['rows_per_s']:>12,.0f}", flush=True)
    if args.json_path:
        with open(args.json_path, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0
