"""Where a spread bank's memory lands on a multi-node Ray cluster, measured:
``python -m benchmarks.cluster_bank --rows 3e7 --nodes 3 --dim 128 --dtype float16``.

A ``ray.cluster_utils.Cluster`` on this machine (a head and ``--nodes - 1`` workers,
each its own raylet with explicit ``num_cpus``, ``memory`` and ``object_store_memory``)
gets a bank started with ``start_bank(..., placement="spread")``. The script then reads
from Ray's state API which node each shard actor is on, and measures memory from
``/proc/<pid>/smaps_rollup``: each shard process's PSS and RSS, and the PSS of every
process of each node (the node's Ray processes and all their descendants, the shards
among them). A short Step workload through ``BankClient`` shows the bank serves. It
prints a markdown table per node (and with ``--output-dir`` writes ``results.md`` and
``results.json``), and stops the bank and the cluster whatever happens.

Each node's ``memory`` is what its shards reserve plus headroom; a cluster that the
machine's MemAvailable cannot hold is refused before anything starts. The shards write
their update logs under a temporary folder that is removed at the end; no snapshot of
the rows is written (it would cost seconds per GB of disk and measure nothing here).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import signal
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from bank_server.shard import DTYPES, memory_bytes, rows_on_shard
from benchmarks.args import positive_int
from benchmarks.bank_grid import GIB, format_rows, memory_available
from benchmarks.report import markdown
from benchmarks.timing import percentile_ms, timed_calls
from benchmarks.workload import MOMENTUM, StepWorkload

MIB = 1 << 20
# Slack on each node's `memory` resource beyond what its shards reserve: a reservation is
# the shard's own estimate (shard.memory_bytes), and a node sized to the byte would turn a
# shard away as soon as that estimate grows.
_HEADROOM_FRACTION, _MIN_HEADROOM = 0.10, 128 * MIB
# Ray's minimum is 75 MiB. The bank never puts anything in the object store; it only has
# to exist, and on Linux its pages are taken from /dev/shm as they are used.
OBJECT_STORE_BYTES = 128 * MIB
# What Ray's own processes held, in RSS, on this machine's 3-node cluster: on the head the
# GCS, the dashboard with its nine forked heads, the monitors, the raylet and its two
# agents, about 1.5 GiB; on a worker node the raylet and its two agents, about 0.25 GiB.
# The check below counts them on top of the reservations, with some margin.
_RAY_HEAD_BYTES, _RAY_WORKER_BYTES = 2 * GIB, 384 * MIB
_DRIVER_BYTES = 512 * MIB
# Kept free of MemAvailable for the page cache and everything else on the machine.
_MARGIN_FRACTION, _MIN_MARGIN = 0.1, 1 * GIB
# One core initialises about 500,000 rows a second here, but the shards start together on
# two cores that others use too: the start's deadline allows ten times as long.
_START_S, _ROWS_PER_S = 120.0, 50_000
_STATE_API_WAIT_S = 60.0


class MachineTooSmall(RuntimeError):
    """The machine's MemAvailable cannot hold the cluster the bank needs."""


def cluster_plan(rows: int, nodes: int, shards: int, dim: int, dtype: str) -> dict:
    """What each shard reserves, each node's ``memory`` resource, and what the whole
    cluster may take of the machine."""
    needs = [memory_bytes(rows_on_shard(rows, shards, s), dim, dtype) for s in range(shards)]
    # start_bank deals the shards one per node while nodes last, so no node gets more
    # than ceil(S / nodes); sizing every node for the biggest of those keeps the plan free.
    per_node = math.ceil(shards / nodes)
    bank_bytes = sum(sorted(needs, reverse=True)[:per_node])
    node_memory = bank_bytes + max(_MIN_HEADROOM, int(_HEADROOM_FRACTION * bank_bytes))
    machine = (nodes * (node_memory + OBJECT_STORE_BYTES) + _RAY_HEAD_BYTES + (nodes - 1) * _RAY_WORKER_BYTES
               + _DRIVER_BYTES)
    return {"shard_reservations": needs, "node_memory": node_memory, "object_store_memory": OBJECT_STORE_BYTES,
            "machine_need": machine}


def check_fits(plan: dict, available: int, rows: int, dim: int, dtype: str, nodes: int) -> None:
    usable = available - max(_MIN_MARGIN, int(_MARGIN_FRACTION * available))
    if plan["machine_need"] > usable:
        raise MachineTooSmall(
            f"a {format_rows(rows)}-row {dtype} bank (dim {dim}) on a {nodes}-node cluster needs "
            f"{plan['machine_need'] / GIB:.1f} GiB of this machine: {nodes} x ({plan['node_memory'] / GIB:.2f} GiB "
            f"memory resource + {OBJECT_STORE_BYTES / GIB:.2f} GiB object store) + Ray's own processes "
            f"({(_RAY_HEAD_BYTES + (nodes - 1) * _RAY_WORKER_BYTES) / GIB:.1f} GiB) + this driver "
            f"({_DRIVER_BYTES / GIB:.1f} GiB); only {usable / GIB:.1f} GiB is usable (MemAvailable "
            f"{available / GIB:.1f} GiB less a safety margin). Nothing was started: use fewer rows or float16, "
            "or a machine with more memory")


# -- /proc ---------------------------------------------------------------------------

def smaps_rollup(pid: int) -> dict[str, int] | None:
    """PSS, RSS and anonymous PSS of a process in bytes; None when it has gone or may not be read."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    values = {key: int(kb) * 1024 for key, kb in re.findall(r"^(\w+):\s+(\d+) kB", text, re.MULTILINE)}
    if "Pss" not in values:  # a zombie has no mappings left
        return None
    return {"pss": values["Pss"], "rss": values["Rss"], "pss_anon": values.get("Pss_Anon", 0)}


def peak_rss(pid: int) -> int | None:
    """VmHWM: the most the process ever had resident, so a start-up that held a second
    copy of the rows shows here even though it is gone by the time PSS is read."""
    try:
        found = re.search(r"^VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.MULTILINE)
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return int(found.group(1)) * 1024 if found else None


def _parents() -> dict[int, int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                # The command name may hold spaces and parentheses: the fields follow the last ')'.
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                continue
    return parents


def descendants(roots: set[int], parents: dict[int, int]) -> set[int]:
    """`roots` and every process below them."""
    found, frontier = set(roots), set(roots)
    children: dict[int, list[int]] = {}
    for pid, parent in parents.items():
        children.setdefault(parent, []).append(pid)
    while frontier:
        frontier = {child for pid in frontier for child in children.get(pid, ()) if child not in found}
        found |= frontier
    return found


def _command(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return "?"
    first = argv[0].decode(errors="replace")
    # Ray's workers and the dashboard's forked heads retitle themselves ("ray::BankShardActor",
    # "ray-dashboard-NodeHead-0 (...)"); Python services say which script they run.
    if " " in first:
        return first.split(" ", 1)[0][:60]
    if first.endswith(("python", "python3")) or re.search(r"python3\.\d+$", first):
        script = next((a.decode(errors="replace") for a in argv[1:] if a.endswith(b".py")), "")
        return f"python {Path(script).name}" if script else first.rsplit("/", 1)[-1]
    return first.rsplit("/", 1)[-1][:60]


def node_processes(cluster) -> dict[str, list[dict]]:
    """Per node id, every process of the node: those Ray started for it (its raylet, and on
    the head the GCS, dashboard and monitors) and their descendants (the raylet's agents
    and workers, the shard actors among them), each with its memory."""
    parents = _parents()
    out = {}
    for node in cluster.list_all_nodes():
        roots = {info.process.pid for infos in node.all_processes.values() for info in infos}
        rows = []
        for pid in sorted(descendants(roots, parents)):
            memory = smaps_rollup(pid)
            if memory is not None:
                rows.append({"pid": pid, "command": _command(pid), **memory})
        out[node.node_id] = rows
    return out


# -- where the shards are --------------------------------------------------------------

def shard_locations(handle, address: str) -> tuple[list[dict], str]:
    """Node id and pid of each shard from Ray's state API (the dashboard may still be
    coming up: it is asked again for a while), checked against what each actor says of
    itself; (one dict per shard, where the answer came from)."""
    import ray
    from ray.util.state import list_actors

    own = (ray.get([actor.node_id.remote() for actor in handle.actors]),
           ray.get([actor.pid.remote() for actor in handle.actors]))
    deadline, error = time.monotonic() + _STATE_API_WAIT_S, None
    while time.monotonic() < deadline:
        try:
            # The address is given: without it the state API picks "the latest" Ray on the machine.
            alive = list_actors(address=address, filters=[("state", "=", "ALIVE")], limit=10_000)
            found = {a.name: a for a in alive}
            if all(name in found for name in handle.names):
                break
        except Exception as failure:  # the dashboard's state endpoint not up yet, or not installed
            error = failure
        time.sleep(1.0)
    else:
        print(f"Ray's state API did not list the shards within {_STATE_API_WAIT_S:g} s ({error}); using what "
              "each shard actor reports of itself", file=sys.stderr, flush=True)
        return ([{"node_id": n, "pid": p, "actor_agrees": n == planned} for n, p, planned in zip(*own, handle.nodes)],
                "the actors themselves")
    where = []
    for s, name in enumerate(handle.names):
        actor = found[name]
        agrees = actor.node_id == own[0][s] and actor.pid == own[1][s] and actor.node_id == handle.nodes[s]
        if not agrees:
            print(f"shard {s}: the state API says node {actor.node_id[:12]} pid {actor.pid}, the actor says node "
                  f"{own[0][s][:12]} pid {own[1][s]}, the plan said node {handle.nodes[s][:12]}",
                  file=sys.stderr, flush=True)
        where.append({"node_id": actor.node_id, "pid": actor.pid, "actor_agrees": agrees})
    return where, "ray.util.state.list_actors"


# -- the run ---------------------------------------------------------------------------

class _Clock:
    """Seconds from ``start()`` to the end of the ``with`` block it was entered in first:
    the clean-up, which runs as the stack unwinds."""

    def __init__(self):
        self.began, self.seconds = None, 0.0

    def start(self) -> None:
        self.began = time.perf_counter()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.began is not None:
            self.seconds = time.perf_counter() - self.began


def _say(message: str) -> None:
    print(f"[cluster_bank] {message}", flush=True)


def run(rows: int = 30_000_000, nodes: int = 3, dim: int = 128, dtype: str = "float16", *,
        shards: int | None = None, cpus_per_node: int = 1, steps: int = 50, batch: int = 256,
        negatives: int = 4096, output_dir: str | Path | None = None, workdir: str | Path | None = None) -> dict:
    """Start the cluster and the bank, measure, run the workload, stop everything; the
    results (also written to `output_dir` when given)."""
    import ray
    from ray.cluster_utils import Cluster

    from bank_server.ray_bank import start_bank

    shards = nodes if shards is None else shards
    if nodes < 1 or shards < 1 or rows < shards:
        raise ValueError(f"need nodes >= 1, shards >= 1 and rows >= shards (got {nodes}, {shards}, {rows})")
    if ray.is_initialized():
        raise RuntimeError("this process is already connected to a Ray: the benchmark starts and connects to its "
                           "own cluster")
    plan = cluster_plan(rows, nodes, shards, dim, dtype)
    available = memory_available()
    check_fits(plan, available, rows, dim, dtype, nodes)
    node_args = {"num_cpus": cpus_per_node, "memory": plan["node_memory"],
                 "object_store_memory": plan["object_store_memory"]}
    batch, negatives = min(batch, rows), min(negatives, rows)
    timings: dict[str, float] = {}
    began = time.perf_counter()
    handle = None
    # Every clean-up step runs, in reverse order of its start, even when one before it fails.
    with ExitStack() as stack:
        scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="instdisc-cluster-bank-", dir=workdir))
        stopping = stack.enter_context(_Clock())
        try:
            _say(f"starting a {nodes}-node Ray cluster, each node {cpus_per_node} CPU, "
                 f"{plan['node_memory'] / GIB:.2f} GiB memory, {OBJECT_STORE_BYTES / MIB:.0f} MiB object store")
            start = time.perf_counter()
            # Made empty first, so that a node failing to start still leaves a cluster to shut down.
            cluster = Cluster(initialize_head=False)
            stack.callback(cluster.shutdown)
            # Other Rays on this machine (test runs, other users) may hold the head's default
            # dashboard and agent ports: let the dashboard look further and the agent take any.
            cluster.add_node(dashboard_port=None, dashboard_agent_listen_port=None, **node_args)
            for _ in range(nodes - 1):
                cluster.add_node(**node_args)
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, log_to_driver=False)
            stack.callback(ray.shutdown)
            timings["cluster_start_s"] = time.perf_counter() - start

            _say(f"starting {shards} shard(s) of a {format_rows(rows)}-row {dtype} bank (dim {dim}), spread")
            start = time.perf_counter()
            handle = start_bank(shards, rows, dim, dtype, snapshot_dir=str(Path(scratch) / "bank"),
                                name="cluster-bank", placement="spread", timeout=_START_S + rows / _ROWS_PER_S)
            stack.callback(handle.stop, final_snapshot=False)
            timings["bank_start_s"] = time.perf_counter() - start
            for line in handle.describe():
                _say(line)

            where, source = shard_locations(handle, cluster.address)
            processes = node_processes(cluster)
            shard_memory = [{**(smaps_rollup(w["pid"]) or {}), "peak_rss": peak_rss(w["pid"])} for w in where]

            _say(f"{steps} Steps of B={batch}, K={negatives}")
            client = stack.enter_context(handle.client(timeout=120))
            workload = StepWorkload(rows, dim, batch, seed=0, count=min(max(steps, 1), 64))

            def one_step(i: int) -> None:
                idx = workload.indices(i)
                client.step(update_indices=idx, update_features=workload.features(i), momentum=MOMENTUM,
                            lookup_indices=idx, negatives=negatives)

            start = time.perf_counter()
            seconds = timed_calls(one_step, steps, warmup=min(3, steps))
            timings["workload_s"] = time.perf_counter() - start
            steps_done = {"steps": steps, "batch": batch, "negatives": negatives,
                          "step_p50_ms": percentile_ms(seconds, 50) if seconds else None,
                          "step_p99_ms": percentile_ms(seconds, 99) if seconds else None}
            for w, memory in zip(where, shard_memory):
                memory["pss_after_steps"] = (smaps_rollup(w["pid"]) or {}).get("pss")
                memory["peak_rss"] = peak_rss(w["pid"])
            nodes_ids = [n.node_id for n in cluster.list_all_nodes()]
            head_id = cluster.head_node.node_id
        finally:
            stopping.start()
    timings["stop_s"] = stopping.seconds
    timings["total_s"] = time.perf_counter() - began
    results = _results(rows, dim, dtype, shards, plan, available, handle, where, source, shard_memory, processes,
                       nodes_ids, head_id, steps_done, timings, cpus_per_node)
    text = render(results)
    print(text, flush=True)
    if output_dir is not None:
        output = Path(output_dir)
        output.mkdir(parents=True, exist_ok=True)
        (output / "results.md").write_text(text)
        (output / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        _say(f"written: {output / 'results.md'}, {output / 'results.json'}")
    return results


def _results(rows, dim, dtype, shards, plan, available, handle, where, source, shard_memory, processes, node_ids,
             head_id, workload, timings, cpus_per_node) -> dict:
    row_bytes = dim * DTYPES[dtype].itemsize
    shard_rows = [{"shard": s, "node_id": w["node_id"], "pid": w["pid"], "rows": rows_on_shard(rows, shards, s),
                   "reserved_bytes": handle.memory[s], "planned_node_id": handle.nodes[s],
                   "actor_agrees": w["actor_agrees"], **shard_memory[s]}
                  for s, w in enumerate(where)]
    shard_pss_total = sum(r.get("pss", 0) for r in shard_rows)
    # Nodes in the order of their first shard, empty ones last: the table reads shard by shard.
    order = sorted(node_ids, key=lambda n: min([r["shard"] for r in shard_rows if r["node_id"] == n] or [shards]))
    per_node = []
    for node in order:
        held = [r for r in shard_rows if r["node_id"] == node]
        procs = processes.get(node, [])
        shard_pss = sum(r.get("pss", 0) for r in held)
        per_node.append({
            "node_id": node, "role": "head" if node == head_id else "worker",
            "shards": [r["shard"] for r in held], "rows": sum(r["rows"] for r in held),
            "memory_resource_bytes": plan["node_memory"],
            "reserved_bytes": sum(r["reserved_bytes"] for r in held),
            "shard_pss_bytes": shard_pss, "shard_rss_bytes": sum(r.get("rss", 0) for r in held),
            "shard_peak_rss_bytes": sum(r.get("peak_rss") or 0 for r in held),
            "node_pss_bytes": sum(p["pss"] for p in procs), "node_processes": len(procs),
            "rows_fraction": sum(r["rows"] for r in held) / rows,
            "shard_pss_fraction": shard_pss / shard_pss_total if shard_pss_total else None,
            "processes": procs,
        })
    import ray

    me = os.getpid()
    return {
        "config": {"rows": rows, "nodes": len(node_ids), "shards": shards, "dim": dim, "dtype": dtype,
                   "cpus_per_node": cpus_per_node, "memory_per_node_bytes": plan["node_memory"],
                   "object_store_per_node_bytes": plan["object_store_memory"]},
        "machine": {"cpus": os.cpu_count(), "mem_available_at_start_bytes": available,
                    "machine_need_bytes": plan["machine_need"], "python": platform.python_version(),
                    "ray": ray.__version__},
        "bank_bytes": rows * row_bytes,
        "placement_source": source,
        "shards": shard_rows,
        "nodes": per_node,
        "driver": {"pid": me, **(smaps_rollup(me) or {})},
        "workload": workload,
        "timings_s": timings,
    }


def _gib(value) -> str:
    return "-" if value is None else f"{value / GIB:.2f}"


def render(results: dict) -> str:
    c = results["config"]
    table = [{"node": f"{n['node_id'][:12]} ({n['role']})", "shard(s)": ", ".join(map(str, n["shards"])) or "-",
              "rows held": n["rows"], "reserved GiB": _gib(n["reserved_bytes"]),
              "shard PSS GiB": _gib(n["shard_pss_bytes"]), "shard RSS GiB": _gib(n["shard_rss_bytes"]),
              "shard peak RSS GiB": _gib(n["shard_peak_rss_bytes"]),
              "node PSS GiB (processes)": f"{_gib(n['node_pss_bytes'])} ({n['node_processes']})",
              "fraction of rows": f"{n['rows_fraction']:.3f}",
              "fraction of shard PSS": "-" if n["shard_pss_fraction"] is None else f"{n['shard_pss_fraction']:.3f}"}
             for n in results["nodes"]]
    w, t = results["workload"], results["timings_s"]
    shard_pss = sum(n["shard_pss_bytes"] for n in results["nodes"])
    p50 = "-" if w["step_p50_ms"] is None else f"{w['step_p50_ms']:.1f}"
    p99 = "-" if w["step_p99_ms"] is None else f"{w['step_p99_ms']:.1f}"
    notes = [
        f"{format_rows(c['rows'])} rows x {c['dim']} {c['dtype']} = {results['bank_bytes'] / GIB:.2f} GiB of rows, "
        f"{c['shards']} shard(s) on a {c['nodes']}-node `ray.cluster_utils.Cluster` (each node {c['cpus_per_node']} "
        f"CPU, {_gib(c['memory_per_node_bytes'])} GiB `memory`, {c['object_store_per_node_bytes'] >> 20} MiB object "
        f"store); {results['machine']['cpus']} CPUs, MemAvailable "
        f"{_gib(results['machine']['mem_available_at_start_bytes'])} GiB at start.",
        f"Shard nodes from {results['placement_source']}; memory from /proc/<pid>/smaps_rollup after start-up, "
        "before the Steps; peak RSS is VmHWM at the end. Node PSS sums every process of the node (its raylet, "
        "agents and workers; on the head also the GCS, dashboard and monitors); this driver, "
        f"{_gib(results['driver'].get('pss'))} GiB PSS, is not counted.",
        f"Shards' PSS {shard_pss / GIB:.2f} GiB in all, {shard_pss / max(1, results['bank_bytes']):.3f} x the rows' "
        f"bytes. {w['steps']} Steps of B={w['batch']}, K={w['negatives']} through BankClient: p50 {p50} ms, "
        f"p99 {p99} ms.",
        f"Times: cluster start {t['cluster_start_s']:.1f} s, bank start (row initialisation) "
        f"{t['bank_start_s']:.1f} s, Steps {t['workload_s']:.1f} s, stop {t['stop_s']:.1f} s, "
        f"total {t['total_s']:.1f} s.",
    ]
    return markdown(table, "A spread bank on a local Ray cluster: memory per node", [f"- {n}" for n in notes],
                    list(table[0]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cluster_bank", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=positive_int, default=30_000_000, help="bank rows (default 3e7)")
    parser.add_argument("--nodes", type=positive_int, default=3, help="Ray nodes: a head and nodes-1 workers")
    parser.add_argument("--shards", type=positive_int, default=None, help="bank shards (default: one per node)")
    parser.add_argument("--dim", type=positive_int, default=128)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float16")
    parser.add_argument("--cpus-per-node", type=positive_int, default=1, help="each node's num_cpus (default 1)")
    parser.add_argument("--steps", type=int, default=50, help="timed Steps of the sanity workload (default 50)")
    parser.add_argument("--batch", type=positive_int, default=256, help="B: rows updated and looked up per Step")
    parser.add_argument("--negatives", type=positive_int, default=4096, help="K: rows sampled per Step")
    parser.add_argument("--output-dir", default=None, help="write results.md and results.json here")
    args = parser.parse_args(argv)

    def interrupted(signum, frame):  # unwinds through run()'s clean-up, as Ctrl-C does
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, interrupted)
    try:
        run(args.rows, args.nodes, args.dim, args.dtype, shards=args.shards, cpus_per_node=args.cpus_per_node,
            steps=max(0, args.steps), batch=args.batch, negatives=args.negatives, output_dir=args.output_dir)
    except MachineTooSmall as refused:
        print(f"refused: {refused}", file=sys.stderr)
        return 2
    finally:  # main() may be called from a longer-lived process (the tests)
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
