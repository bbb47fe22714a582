"""`instdisc bench bank`: the training step's bank round trip, measured three ways in
one run so the ratios mean something on any machine:

- ``step``: ``BankClient.step`` against real shard servers (separate processes);
- ``inprocess``: the same update + lookup + sample on ``Shard`` objects in this process
  (the floor: no serialisation, no network);
- ``raw``: the client's own Step requests, recorded while it makes its warm-up Steps
  (`recorded_step_requests`), sent again to the same shards as bytes, their answers left
  unparsed: the shards' part of a Step with none of the client's code around the call
  (so ``step - raw`` is the client's part). Not measured when a Step does not fit one
  message per shard;
- ``echo``: a raw gRPC unary call per shard moving the same request and answer bytes
  with no work on the server (the floor for any gRPC design, `benchmarks.echo`).

Step, echo and raw take turns call by call, who goes first rotating, so whatever else
the machine does hits them alike. Then, on the same servers, `--clients` Step client processes at a time say how
many Step calls per second one shard process sustains: every client's Step reaches
every shard, so a shard serves as many calls as the clients make Steps. On a machine
where the clients share the shards' cores, that is a floor; the shard processes' own
CPU time per call says what a shard with a core to itself would sustain.

With ``--duration SECONDS`` that part is a load test: each client count makes Steps for
SECONDS instead of ``--client-iters``, and reports p50/p99/max latency, the failed
Steps (the command exits 1 unless there are none), and rows/s and calls/s per shard.
``--fsync MODE`` runs the shards with their update log (a snapshot folder in
``--log-dir``) in that mode, as a deployment would.

With ``--fsync-modes`` it measures the update log's cost instead: one bank per mode
(``off``: no snapshot folder, so no log; ``no``, ``everysec``, ``always``: ``--fsync``),
all serving at once, and each iteration makes one Step on every bank, in an order that
rotates, so that whatever else the machine does hits every mode alike.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

import numpy as np

from bank_server import update_log
from bank_server.client import BankClient
from bank_server.shard import Layout, Shard, rows_on_shard
from benchmarks.args import comma_list, positive_int
from benchmarks.echo import RawCalls, echo_calls
from benchmarks.processes import ServerProcess, cpu_seconds, pin, start_bank_processes
from benchmarks.step_client import run_step_clients
from benchmarks.timing import percentile_ms, timed_calls, timed_turns
from benchmarks.workload import MOMENTUM, StepWorkload, step_message_bytes
from protos import bank_pb2


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
    parser.add_argument("--clients", type=_shard_counts, default="1,4,8",
                        help="comma-separated counts of concurrent Step client processes for the throughput part")
    parser.add_argument("--client-iters", type=positive_int, default=200, help="timed Steps per client")
    parser.add_argument("--duration", type=_seconds, default=None, metavar="SECONDS",
                        help="a load test instead: each --clients count makes Steps for SECONDS, counting failed "
                             "ones (the command exits 1 if any failed); p50/p99/max, rows/s and calls/s per shard")
    parser.add_argument("--fsync", choices=update_log.FSYNC_MODES, default=None,
                        help="run the shards with their update log in this mode (a snapshot folder in --log-dir); "
                             "default: no snapshot folder, no log")
    parser.add_argument("--json", dest="json_path", help="also write the results here as a JSON list")
    parser.add_argument("--fsync-modes", type=_fsync_modes, default=None,
                        help="instead: Step latency with the update log in each of these modes, interleaved call by "
                             "call (comma-separated from off,no,everysec,always; off: no log)")
    parser.add_argument("--log-dir", default=None,
                        help="with --fsync-modes or --fsync: where the logging banks keep their snapshot folders "
                             "(default: a temporary folder; put it on the disk you mean to measure)")


FSYNC_MODES = ("off", *update_log.FSYNC_MODES)  # off: no snapshot folder, so no log
_STEP_METHOD = f"/{bank_pb2.DESCRIPTOR.services_by_name['MemoryBank'].full_name}/Step"


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 < value <= 24 * 3600:
        raise argparse.ArgumentTypeError(f"must be in (0, 86400] seconds, got {text!r}")
    return value


def _fsync_modes(text: str) -> list[str]:
    modes = comma_list(text, str.strip)
    unknown = [m for m in modes if m not in FSYNC_MODES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown mode(s) {unknown}; choose from {','.join(FSYNC_MODES)}")
    return modes


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


def recorded_step_requests(client: BankClient, work: StepWorkload, negatives: int) -> list[list[bytes]] | None:
    """The Step requests `client` sends to its shards for each batch of `work`, recorded
    while it makes those Steps on its bank (routing, negatives' split and all), each less
    its client id and sequence so that a raw call of it applies its update every time
    (none is taken for a retry). None when a Step does not go out as one Step per shard
    (parts over a message, sent in a second wave): raw calls of the first wave would not
    be the same work."""
    sent: list[tuple[str, list]] = []
    fan_out = client._fan_out

    def recording(method, calls):
        sent.append((method, calls))
        return fan_out(method, calls)

    with mock.patch.object(client, "_fan_out", recording):
        for i in range(len(work)):
            client.step(work.indices(i), work.features(i), MOMENTUM, work.indices(i + 1), negatives)
    if any(method != "Step" for method, _ in sent) or any(len(calls) != client.num_shards for _, calls in sent):
        return None
    steps = []
    for _, calls in sent:
        requests = []
        for _, request in sorted(calls, key=lambda call: call[0]):
            request.update.ClearField("client_id")  # the client is done with these messages: sent and answered
            request.update.ClearField("sequence")
            requests.append(request.SerializeToString())
        steps.append(requests)
    return steps


def _throughput(servers, rows, dim, batch, negatives, clients, client_iters, duration=None, cpus=None) -> dict:
    """Per client count: `run_step_clients`' figures, plus the busiest shard process's CPU
    time per call (warm-up calls count too: each client makes warmup_calls(client_iters) more)."""
    results = {}
    for c in clients:
        before = [cpu_seconds(s.proc.pid) for s in servers]
        results[c] = run_step_clients([s.address for s in servers], rows, dim, batch, negatives, c, client_iters,
                                      timeout=600, duration=duration, cpus=cpus)
        calls = results[c]["steps"] + results[c]["errors"] + results[c]["warmup_steps"]
        results[c]["cpu_ms_per_call"] = max(1e3 * (cpu_seconds(s.proc.pid) - b) / calls
                                            for s, b in zip(servers, before))
    return results


def _own_cores(rows, dim, dtype, shards, negatives, batch, clients, client_iters) -> dict | None:
    """Step calls/s of shard processes each pinned to a core of its own, the client
    processes on the other cores: a shard's capacity, as on a cluster where shards do not
    share their cores with trainers. With fewer than shards + 1 cores, one shard of the
    bank alone: a bank of one shard holding shard 0's rows (N/S), each Step bringing what
    each shard of the S-shard bank gets (B/S updates and reads, K/S negatives). Being a
    bank's only shard spares it the modulo and division of its indices (a few us of a
    call's 0.5-0.8 ms). None with a single core."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return None
    alone = len(cores) < shards + 1
    if alone:  # shard 0's part, as `step_message_bytes` splits a Step
        rows, batch, negatives = rows_on_shard(rows, shards, 0), len(range(0, batch, shards)), \
            len(range(0, negatives, shards))
        shards = 1
    with ExitStack() as stack:
        servers = start_bank_processes(stack, shards, rows, dim, dtype)
        for core, server in zip(cores, servers):
            pin(server.proc.pid, {core})
        results = _throughput(servers, rows, dim, batch, negatives, clients, client_iters, cpus=cores[shards:])
    return {"alone": alone, "shards": shards, "rows": rows, "batch": batch, "negatives": negatives,
            "calls_per_s": {c: r["steps_per_s"] for c, r in results.items()},
            "step_p50_ms": {c: r["step_p50_ms"] for c, r in results.items()},
            "step_p99_ms": {c: r["step_p99_ms"] for c, r in results.items()},
            "cpu_ms_per_call": {c: r["cpu_ms_per_call"] for c, r in results.items()},
            # The shard core's busy fraction: below 1, the clients' cores set the pace.
            "shard_busy": {c: r["steps_per_s"] * r["cpu_ms_per_call"] / 1e3 for c, r in results.items()}}


def _measure(rows, dim, dtype, shards, negatives, batch, iters, warmup, clients=(), client_iters=200,
             duration=None, fsync=None, log_dir=None) -> dict:
    work = StepWorkload(rows, dim, batch, seed=0)
    # Returns before the servers start, so the bank's in-process copies are freed by then.
    inprocess_s = _inprocess_seconds(work, rows, dim, dtype, shards, negatives, iters, warmup)
    sizes = step_message_bytes(batch, negatives, dim, dtype, shards)
    with ExitStack() as stack:
        logged = {}
        if fsync:
            folder = Path(log_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="bank-")))
            logged = {"snapshot_dir": folder / f"shards-{shards}", "extra": ["--fsync", fsync]}
        servers = start_bank_processes(stack, shards, rows, dim, dtype, **logged)
        client = stack.enter_context(BankClient([s.address for s in servers], timeout=120))
        echoes = [stack.enter_context(ServerProcess(["-m", "benchmarks.echo"])) for _ in range(shards)]
        echo = echo_calls([e.address for e in echoes], sizes)
        stack.callback(echo.close)
        recorded = recorded_step_requests(client, work, negatives)
        if recorded is None:
            print(f"(no raw Step with {shards} shard(s): a Step of this size goes out in more than one message "
                  "per shard)", flush=True)
            raw = None
        else:
            raw = RawCalls([s.address for s in servers], _STEP_METHOD, recorded)
            stack.callback(raw.close)

        def step(i):
            client.step(work.indices(i), work.features(i), MOMENTUM, work.indices(i + 1), negatives)

        step_s, echo_s, *raw_s = timed_turns([step, echo] + ([raw] if raw is not None else []), iters, warmup)
        raw_s = raw_s[0] if raw_s else None
        throughput = _throughput(servers, rows, dim, batch, negatives, clients, client_iters, duration)
    # After the bank above has stopped: these shards must have their cores to themselves.
    # Unlogged shards on cores of their own: not run for a load test or logged shards.
    own_cores = _own_cores(rows, dim, dtype, shards, negatives, batch, clients, client_iters) \
        if clients and not duration and not fsync else None

    step_p50, echo_p50, inproc_p50 = (percentile_ms(s, 50) for s in (step_s, echo_s, inprocess_s))
    raw_p50 = percentile_ms(raw_s, 50) if raw_s else None
    return {
        "shards": shards, "rows": rows, "dim": dim, "dtype": dtype, "negatives": negatives, "batch": batch,
        "iters": iters,
        "step_p50_ms": step_p50, "step_p99_ms": percentile_ms(step_s, 99),
        "raw_p50_ms": raw_p50, "raw_p99_ms": percentile_ms(raw_s, 99) if raw_s else None,
        "echo_p50_ms": echo_p50, "echo_p99_ms": percentile_ms(echo_s, 99),
        "inprocess_p50_ms": inproc_p50, "inprocess_p99_ms": percentile_ms(inprocess_s, 99),
        "step_over_echo": step_p50 / echo_p50, "raw_over_echo": raw_p50 / echo_p50 if raw_s else None,
        "step_over_inprocess": step_p50 / inproc_p50,
        "rows_per_s": (2 * batch + negatives) / float(np.mean(step_s)),
        "request_bytes": sum(s[0] for s in sizes), "answer_bytes": sum(s[1] for s in sizes),
        # Every Step reaches every shard: a shard's calls/s is the clients' Steps/s.
        "shard_calls_per_s": {c: t["steps_per_s"] for c, t in throughput.items()},
        "clients_step_p50_ms": {c: t["step_p50_ms"] for c, t in throughput.items()},
        "clients_step_p99_ms": {c: t["step_p99_ms"] for c, t in throughput.items()},
        # The busiest shard process's CPU per call, and what that allows on a core of its own.
        "shard_cpu_ms_per_call": {c: t["cpu_ms_per_call"] for c, t in throughput.items()},
        # None when the run was too short for the clock's ticks (10 ms) to see.
        "shard_calls_per_core_s": {c: 1e3 / t["cpu_ms_per_call"] if t["cpu_ms_per_call"] else None
                                   for c, t in throughput.items()},
        "own_cores": own_cores,
        "fsync": fsync, "duration": duration,
        "clients_step_max_ms": {c: t["step_max_ms"] for c, t in throughput.items()},
        "clients_seconds": {c: t["seconds"] for c, t in throughput.items()},
        "clients_steps": {c: t["steps"] for c, t in throughput.items()},
        "clients_errors": {c: t["errors"] for c, t in throughput.items()},
        "clients_error_messages": {c: t["error_messages"] for c, t in throughput.items()},
        "clients_outages": {c: t["outages"] for c, t in throughput.items()},
        # Every Step moves 2B + K rows over all shards, split evenly by g % S.
        "shard_rows_per_s": {c: t["rows_per_s"] / shards for c, t in throughput.items()},
    }


def _measure_fsync(rows, dim, dtype, shards, negatives, batch, iters, warmup, modes, log_dir=None) -> dict:
    """Step seconds per update-log mode, one bank per mode, interleaved call by call."""
    work = StepWorkload(rows, dim, batch, seed=0)
    with ExitStack() as stack:
        folder = Path(log_dir) if log_dir else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fsync-")))
        clients = {}
        for mode in modes:
            if mode == "off":
                servers = start_bank_processes(stack, shards, rows, dim, dtype)
            else:
                servers = start_bank_processes(stack, shards, rows, dim, dtype, snapshot_dir=folder / mode,
                                               extra=["--fsync", mode])
            clients[mode] = stack.enter_context(BankClient([s.address for s in servers], timeout=120))
        seconds = {mode: [] for mode in modes}
        for i in range(warmup + iters):
            turn = i % len(modes)
            for mode in modes[turn:] + modes[:turn]:
                start = time.perf_counter()
                clients[mode].step(work.indices(i), work.features(i), MOMENTUM, work.indices(i + 1), negatives)
                if i >= warmup:
                    seconds[mode].append(time.perf_counter() - start)
    base = percentile_ms(seconds["off"], 50) if "off" in seconds else None
    return {"shards": shards, "rows": rows, "dim": dim, "dtype": dtype, "negatives": negatives, "batch": batch,
            "iters": iters,
            "modes": {mode: {"step_p50_ms": percentile_ms(s, 50), "step_p99_ms": percentile_ms(s, 99),
                             "p50_over_off": percentile_ms(s, 50) / base if base else None}
                      for mode, s in seconds.items()}}


def run_bench_fsync(args: argparse.Namespace) -> int:
    results = []
    print(f"bank Step with the update log: N={args.rows:,} D={args.dim} {args.dtype} K={args.negatives} "
          f"B={args.batch} iters={args.iters}, modes interleaved call by call", flush=True)
    print(f"{'shards':>6} {'fsync':>9} {'step p50':>9} {'step p99':>9} {'p50/off':>8}")
    for shards in args.shards:
        r = _measure_fsync(args.rows, args.dim, args.dtype, shards, args.negatives, args.batch, args.iters,
                           args.warmup, args.fsync_modes, args.log_dir)
        results.append(r)
        for mode, m in r["modes"].items():
            ratio = f"{m['p50_over_off']:>8.3f}" if m["p50_over_off"] else f"{'-':>8}"
            print(f"{shards:>6} {mode:>9} {m['step_p50_ms']:>7.3f}ms {m['step_p99_ms']:>7.3f}ms {ratio}", flush=True)
    if args.json_path:
        with open(args.json_path, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0


def _report_load(args: argparse.Namespace, results: list[dict]) -> int:
    """The load test's table; 1 if any Step failed."""
    print(f"\nload test: --clients {','.join(map(str, args.clients))} for {args.duration:g} s each, shards "
          f"{'with --fsync ' + args.fsync if args.fsync else 'without an update log'} (Steps of every client; "
          "calls/s and rows/s per shard)")
    print(f"{'shards':>6} {'clients':>7} {'steps':>8} {'p50':>8} {'p99':>8} {'max':>9} {'errors':>6} "
          f"{'calls/s/shard':>13} {'rows/s/shard':>13}")
    failed = []
    for r in results:
        for c in args.clients:
            errors = r["clients_errors"][c]
            print(f"{r['shards']:>6} {c:>7} {r['clients_steps'][c]:>8,} {r['clients_step_p50_ms'][c]:>6.2f}ms "
                  f"{r['clients_step_p99_ms'][c]:>6.2f}ms {r['clients_step_max_ms'][c]:>7.1f}ms {errors:>6} "
                  f"{r['shard_calls_per_s'][c]:>13,.0f} {r['shard_rows_per_s'][c]:>13,.0f}", flush=True)
            if errors:
                failed.append(f"{r['shards']} shard(s), {c} client(s): {errors} failed Step(s), e.g. "
                              + "; ".join(r["clients_error_messages"][c][:2]))
            for outage in r["clients_outages"][c]:
                print(f"  outage seen by a client: {outage}")
    if args.json_path:
        with open(args.json_path, "w") as fh:
            json.dump(results, fh, indent=2)
    for line in failed:
        print(f"FAILED: {line}", flush=True)
    return 1 if failed else 0


def _report_own_cores(args: argparse.Namespace, results: list[dict]) -> None:
    if not any(r["own_cores"] for r in results):
        print("\n(no shard process had a core of its own: one core only, or logged shards)")
        return
    print("\nThe same, each shard process on a core of its own and the clients on the other cores (busy: the "
          "shard core's share in use; below 100%, the clients set the pace and calls/s is a floor):")
    print(f"{'shards':>6} " + " ".join(f"{f'{c} client(s)':>26}" for c in args.clients)
          + "   shard CPU per call, busy   measured on")
    for r in results:
        own = r["own_cores"]
        cells = [f"{own['calls_per_s'][c]:>7,.0f}/s {own['step_p50_ms'][c]:>6.2f}/{own['step_p99_ms'][c]:>6.2f}ms"
                 for c in args.clients]
        cpu = ", ".join(f"{own['cpu_ms_per_call'][c]:.3f} ms {own['shard_busy'][c]:.0%}" if own["cpu_ms_per_call"][c]
                        else "(too short)" for c in args.clients)
        what = (f"one shard alone, serving what each of {r['shards']} does: {own['rows']:,} rows, B={own['batch']}, "
                f"K={own['negatives']}" if own["alone"] else "the bank itself")
        print(f"{r['shards']:>6} " + " ".join(f"{cell:>26}" for cell in cells) + f"   {cpu}   {what}", flush=True)


def run_bench_bank(args: argparse.Namespace) -> int:
    if getattr(args, "fsync_modes", None):
        return run_bench_fsync(args)
    results = []
    print(f"bank Step benchmark: N={args.rows:,} D={args.dim} {args.dtype} K={args.negatives} B={args.batch} "
          f"iters={args.iters}", flush=True)
    print(f"{'shards':>6} {'step p50':>9} {'step p99':>9} {'raw p50':>9} {'echo p50':>9} {'inproc p50':>10} "
          f"{'step/echo':>9} {'raw/echo':>8} {'rows/s':>12}")
    for shards in args.shards:
        r = _measure(args.rows, args.dim, args.dtype, shards, args.negatives, args.batch, args.iters, args.warmup,
                     args.clients, args.client_iters, args.duration, args.fsync, args.log_dir)
        results.append(r)
        raw_p50, raw_ratio = (f"{r['raw_p50_ms']:>7.2f}ms", f"{r['raw_over_echo']:>8.2f}") if r["raw_p50_ms"] else \
            (f"{'-':>9}", f"{'-':>8}")
        print(f"{shards:>6} {r['step_p50_ms']:>7.2f}ms {r['step_p99_ms']:>7.2f}ms {raw_p50} "
              f"{r['echo_p50_ms']:>7.2f}ms {r['inprocess_p50_ms']:>8.2f}ms {r['step_over_echo']:>9.2f} "
              f"{raw_ratio} {r['rows_per_s']:>12,.0f}", flush=True)
    if args.clients and args.duration:
        return _report_load(args, results)
    if args.clients:
        print(f"\nStep calls/s one shard process sustains ({args.client_iters} Steps per client; p50/p99 of the "
              "clients' Steps):")
        print(f"{'shards':>6} " + " ".join(f"{f'{c} client(s)':>26}" for c in args.clients)
              + "   shard CPU per call (calls/s on a core of its own)")
        for r in results:
            cells = [f"{r['shard_calls_per_s'][c]:>7,.0f}/s {r['clients_step_p50_ms'][c]:>6.2f}/"
                     f"{r['clients_step_p99_ms'][c]:>6.2f}ms" for c in args.clients]
            cpu = ", ".join("too short to measure" if r["shard_calls_per_core_s"][c] is None else
                            f"{r['shard_cpu_ms_per_call'][c]:.3f} ms ({r['shard_calls_per_core_s'][c]:,.0f}/s)"
                            for c in args.clients)
            print(f"{r['shards']:>6} " + " ".join(f"{cell:>26}" for cell in cells) + f"   {cpu}", flush=True)
        _report_own_cores(args, results)
    if args.json_path:
        with open(args.json_path, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0
