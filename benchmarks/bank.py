"""`instdisc bench bank`: is the remote bank fast enough? A training step's bank round
trip measured three ways in one run, so that the ratios mean something on any machine:

- ``step``: ``BankClient.step`` against real shard servers (separate processes);
- ``echo``: a plain gRPC unary call per shard moving the same request and answer bytes
  with no work on the server (`benchmarks.echo`): the floor for any gRPC design;
- ``inprocess``: the same update, lookup and sample on ``Shard`` objects in this process:
  the floor with no serialisation and no network.

Step and echo take turns call by call, so whatever else the machine does hits both
alike. Then `--clients` Step client processes at a time say how many Step calls per
second one shard process serves: every client's Step reaches every shard. Where the
clients share the shards' cores that is a floor; the shard processes' own CPU time per
call says what a shard with a core to itself would serve.
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
from benchmarks.servers import Server, cpu_seconds, start_shards
from benchmarks.steps import MOMENTUM, StepWorkload, percentile_ms, run_step_clients, step_bytes, timed_calls


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for flag, default in (("--rows", 10**6), ("--dim", 128), ("--negatives", 4096), ("--batch", 256), ("--iters", 300)):
        parser.add_argument(flag, type=positive_int, default=default)
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    parser.add_argument("--shards", type=counts, default="1,2", help="comma-separated shard counts")
    parser.add_argument("--warmup", type=int, default=30)
    clients = "comma-separated counts of concurrent Step client processes, for calls/s per shard"
    parser.add_argument("--clients", type=counts, default="1,4,8", help=clients)
    parser.add_argument("--client-iters", type=positive_int, default=200, help="timed Steps per client")
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
        addresses, spec = [s.address for s in servers], (args.rows, args.dim, args.batch, args.negatives)
        client = stack.enter_context(BankClient(addresses, timeout=120))
        echo_servers = [Server(["-m", "benchmarks.echo"]) for _ in range(shards)]
        for server in echo_servers:
            stack.callback(server.stop)
        echo = EchoCalls([e.address for e in echo_servers], sizes)
        stack.callback(echo.close)
        step, echoed = timed_calls([lambda i: work.step(client, i, args.negatives), echo], args.iters, args.warmup)
        clients = {}
        for count in args.clients:
            before = [cpu_seconds(s.proc.pid) for s in servers]
            load = run_step_clients(addresses, *spec, count, args.client_iters)
            calls = load["steps"] + load["warmup_steps"]
            # The busiest shard's CPU per call; 0 when the run was shorter than the clock's 10 ms ticks.
            cpu_ms = max(1e3 * (cpu_seconds(s.proc.pid) - b) / calls for s, b in zip(servers, before))
            clients[count] = dict(calls_per_s=load["steps_per_s"], step_p50_ms=load["step_p50_ms"])
            clients[count] |= dict(step_p99_ms=load["step_p99_ms"], shard_cpu_ms_per_call=cpu_ms)
            clients[count]["calls_per_core_s"] = 1e3 / cpu_ms if cpu_ms else None
    result = {key: getattr(args, key) for key in ("rows", "dim", "dtype", "negatives", "batch", "iters", "fsync")}
    for name, seconds in (("step", step), ("echo", echoed), ("inprocess", inprocess)):
        result |= {f"{name}_p50_ms": percentile_ms(seconds, 50), f"{name}_p99_ms": percentile_ms(seconds, 99)}
    result["step_over_echo"] = result["step_p50_ms"] / result["echo_p50_ms"]
    result["step_over_inprocess"] = result["step_p50_ms"] / result["inprocess_p50_ms"]
    result["rows_per_s"] = (2 * args.batch + args.negatives) / float(np.mean(step))
    result |= dict(request_bytes=sum(s[0] for s in sizes), answer_bytes=sum(s[1] for s in sizes), clients=clients)
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
    print("\nStep calls/s one shard process serves (p50/p99 of the clients' Steps; its CPU per call: calls/s per core)")
    for r in results:
        for count, c in r["clients"].items():
            own = f"{c['shard_cpu_ms_per_call']:.3f} ms ({c['calls_per_core_s'] or 0:,.0f}/s)"
            print(f"{r['shards']:>3} shard(s), {count:>2} client(s): {c['calls_per_s']:>7,.0f}/s ", end="")
            print(f"{c['step_p50_ms']:>6.2f}/{c['step_p99_ms']:.2f} ms   CPU {own if c['calls_per_core_s'] else '-'}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(results, indent=2))
    return 0
