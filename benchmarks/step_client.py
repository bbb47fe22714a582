"""`Step` clients in processes of their own (threads would share one GIL and flatten
the throughput-vs-clients curve), started together against one bank.

A client (``python -m benchmarks.step_client SPEC``, SPEC as JSON) replays a
`StepWorkload`, prints ``ready`` after its warm-up, starts timing when a line comes
on stdin, and prints its latencies and its monotonic start and end as one JSON line.

With ``duration`` in SPEC it makes Steps for that many seconds instead of ``iters``, and
a failed Step is counted (with the first few messages) and the next one made, so a load
test reports its errors rather than dying at the first; without it a failure ends the
client, as before.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack

import numpy as np

from bank_server.client import BankClient
from benchmarks.processes import ChildProcess, pin
from benchmarks.timing import percentile_ms, timed_calls
from benchmarks.workload import MOMENTUM, StepWorkload


def warmup_calls(iters: int) -> int:
    """Untimed calls before `iters` timed ones: enough for connections and caches."""
    return max(3, iters // 10)


_ERRORS_KEPT = 5


def _for_duration(step, first: int, seconds: float) -> tuple[list[float], int, list[str]]:
    """Steps for `seconds` (each call bounded by the client's timeout): the successful
    calls' seconds, the failures and the first few of their messages."""
    latencies, errors, messages = [], 0, []
    end = time.monotonic() + seconds
    i = first
    while time.monotonic() < end:
        start = time.perf_counter()
        try:
            step(i)
            latencies.append(time.perf_counter() - start)
        except Exception as error:  # counted and reported: the load test's verdict
            errors += 1
            if len(messages) < _ERRORS_KEPT:
                messages.append(f"{type(error).__name__}: {error}")
        i += 1
    return latencies, errors, messages


def main(spec: dict) -> None:
    if spec.get("cpus"):  # numpy's BLAS threads are running already: every thread
        pin(os.getpid(), set(spec["cpus"]))
    work = StepWorkload(spec["rows"], spec["dim"], spec["batch"], seed=spec["seed"])
    with BankClient(spec["addresses"], timeout=spec["rpc_timeout"]) as client:
        def step(i):
            client.step(work.indices(i), work.features(i), MOMENTUM, work.indices(i + 1), spec["negatives"])

        warmup = warmup_calls(spec["iters"])
        for i in range(warmup):
            step(i)
        print("ready", flush=True)
        sys.stdin.readline()
        start = time.monotonic()
        if spec.get("duration"):
            latencies, errors, messages = _for_duration(step, warmup, spec["duration"])
        else:
            latencies, errors, messages = timed_calls(step, spec["iters"], 0), 0, []
        end = time.monotonic()
        outages = client.outages()
    print(json.dumps({"latencies": latencies, "errors": errors, "error_messages": messages, "outages": outages,
                      "warmup": warmup, "start": start, "end": end}), flush=True)


def run_step_clients(addresses: list[str], rows: int, dim: int, batch: int, negatives: int, clients: int,
                     iters: int, timeout: float, duration: float | None = None,
                     cpus: Sequence[int] | None = None) -> dict:
    """Step latency over all calls of `clients` clients that start timing together, and
    their aggregate throughput. `timeout` bounds each client's warm-up, its timed calls
    and any one call. With `duration` each client makes Steps for that many seconds
    (after `warmup_calls(iters)` untimed ones), counting failures instead of stopping.
    With `cpus` the clients run on those cores only."""
    with ExitStack() as stack:
        procs = []
        for c in range(clients):
            spec = {"addresses": addresses, "rows": rows, "dim": dim, "batch": batch, "negatives": negatives,
                    "iters": iters, "seed": c, "rpc_timeout": timeout, "duration": duration,
                    "cpus": list(cpus) if cpus else None}
            procs.append(stack.enter_context(
                ChildProcess(["-m", "benchmarks.step_client", json.dumps(spec)], stdin=True)))
        for proc in procs:
            proc.expect(r"^ready$", timeout)
        for proc in procs:
            proc.send("go")
        answers = [json.loads(proc.expect(r"^\{.*\}$", timeout + (duration or 0)).group(0)) for proc in procs]
    latencies = np.concatenate([a["latencies"] for a in answers])
    wall = max(a["end"] for a in answers) - min(a["start"] for a in answers)
    steps = len(latencies)  # successful timed Steps
    if not steps:
        latencies = np.array([np.nan])
    return {"step_p50_ms": percentile_ms(latencies, 50), "step_p99_ms": percentile_ms(latencies, 99),
            "step_max_ms": float(np.max(latencies)) * 1e3, "steps": steps, "seconds": wall,
            "warmup_steps": sum(a["warmup"] for a in answers),
            "errors": sum(a["errors"] for a in answers),
            "error_messages": [m for a in answers for m in a["error_messages"]][:5],
            "outages": [o for a in answers for o in a["outages"]],
            "steps_per_s": steps / wall, "rows_per_s": steps * (2 * batch + negatives) / wall}


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
