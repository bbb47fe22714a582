"""`Step` clients in processes of their own (threads would share one GIL and flatten
the throughput-vs-clients curve), started together against one bank.

A client (``python -m benchmarks.step_client SPEC``, SPEC as JSON) replays a
`StepWorkload`, prints ``ready`` after its warm-up, starts timing when a line comes
on stdin, and prints its latencies and its monotonic start and end as one JSON line.
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import ExitStack

import numpy as np

from bank_server.client import BankClient
from benchmarks.processes import ChildProcess
from benchmarks.timing import percentile_ms, timed_calls
from benchmarks.workload import MOMENTUM, StepWorkload


def warmup_calls(iters: int) -> int:
    """Untimed calls before `iters` timed ones: enough for connections and caches."""
    return max(3, iters // 10)


def main(spec: dict) -> None:
    work = StepWorkload(spec["rows"], spec["dim"], spec["batch"], seed=spec["seed"])
    with BankClient(spec["addresses"], timeout=spec["rpc_timeout"]) as client:
        def step(i):
            client.step(work.indices(i), work.features(i), MOMENTUM, work.indices(i + 1), spec["negatives"])

        for i in range(warmup_calls(spec["iters"])):
            step(i)
        print("ready", flush=True)
        sys.stdin.readline()
        start = time.monotonic()
        latencies = timed_calls(step, spec["iters"], 0)
        end = time.monotonic()
    print(json.dumps({"latencies": latencies, "start": start, "end": end}), flush=True)


def run_step_clients(addresses: list[str], rows: int, dim: int, batch: int, negatives: int, clients: int,
                     iters: int, timeout: float) -> dict:
    """Step latency over all calls of `clients` clients that start timing together, and
    their aggregate throughput. `timeout` bounds each client's warm-up, its timed calls
    and any one call."""
    with ExitStack() as stack:
        procs = []
        for c in range(clients):
            spec = {"addresses": addresses, "rows": rows, "dim": dim, "batch": batch, "negatives": negatives,
                    "iters": iters, "seed": c, "rpc_timeout": timeout}
            procs.append(stack.enter_context(
                ChildProcess(["-m", "benchmarks.step_client", json.dumps(spec)], stdin=True)))
        for proc in procs:
            proc.expect(r"^ready$", timeout)
        for proc in procs:
            proc.send("go")
        answers = [json.loads(proc.expect(r"^\{.*\}$", timeout).group(0)) for proc in procs]
    latencies = np.concatenate([a["latencies"] for a in answers])
    wall = max(a["end"] for a in answers) - min(a["start"] for a in answers)
    steps = clients * iters
    return {"step_p50_ms": percentile_ms(latencies, 50), "step_p99_ms": percentile_ms(latencies, 99),
            "steps_per_s": steps / wall, "rows_per_s": steps * (2 * batch + negatives) / wall}


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
