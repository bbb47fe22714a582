"""kNN after a bank shard is killed mid-run against the same run uninterrupted.

Two `instdisc train` runs with the same config and seed, each against two fresh shard
processes (``--fsync always``) that this script starts. In the second, shard 1 is
SIGKILLed halfway through epoch 1 and started again `--down` seconds later with the
same command and port, as a StatefulSet would. Prints both runs' kNN, the difference,
and the killed run's outage record, and writes them to `--output-dir`/shard_kill.json::

    python -m benchmarks.shard_kill --subset 10000 --epochs 2

Bounded in time: each run is stopped after `--run-timeout` seconds.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.processes import ServerProcess


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shard(args: list[str], log: Path) -> ServerProcess:
    server = ServerProcess(args, stderr=log)
    server.wait_serving(120)
    return server


def run_once(folder: Path, subset: int, epochs: int, overrides: list[str], kill: bool, down_s: float,
             timeout_s: float) -> dict:
    """One run in `folder` (made afresh); with `kill`, shard 1 is killed halfway through
    epoch 1 and restarted `down_s` seconds later. Returns its summary.json."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    ports = [_free_port() for _ in range(2)]

    def shard_args(s: int) -> list[str]:
        return ["-m", "bank_server", "--shard-id", str(s), "--num-shards", "2", "--rows", str(subset),
                "--port", str(ports[s]), "--snapshot-dir", str(folder / "bank"), "--fsync", "always"]

    servers = [_shard(shard_args(s), folder / f"shard-{s}.log") for s in range(2)]
    log = folder / "train.log"
    command = [sys.executable, "-m", "trainer", "--output-dir", str(folder / "out"), "--name", "run",
               f"data.subset={subset}", f"train.epochs={epochs}",
               f"bank.addresses={','.join(s.address for s in servers)}", *overrides]
    print("$ python " + " ".join(command[1:]), flush=True)
    deadline = time.monotonic() + timeout_s
    with open(log, "w") as out:
        train = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        if kill:
            while train.poll() is None and time.monotonic() < deadline:
                done = re.findall(rf"epoch 1/{epochs} step (\d+)/(\d+)", log.read_text(errors="replace"))
                if done and 2 * int(done[-1][0]) >= int(done[-1][1]):
                    break
                time.sleep(0.2)
            else:
                raise RuntimeError(f"the run ended or stalled before the middle of epoch 1; see {log}")
            servers[1].proc.kill()  # SIGKILL, of the process started above
            servers[1].proc.wait(30)
            print(f"killed shard 1 at step {done[-1][0]}/{done[-1][1]} of epoch 1; restarting it in {down_s:g} s",
                  flush=True)
            time.sleep(down_s)
            servers.append(_shard(shard_args(1), folder / "shard-1-restarted.log"))
        train.wait(max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"the run took more than {timeout_s:g} s; see {log}") from None
    finally:
        if train.poll() is None:
            train.terminate()
            train.wait(60)
        for server in servers:
            server.stop()
    if train.returncode != 0:
        raise RuntimeError(f"the run failed (exit {train.returncode}); see {log}")
    return json.loads((folder / "out" / "summary.json").read_text())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.shard_kill", description=__doc__.split("\n\n")[0])
    parser.add_argument("--subset", type=int, default=10000, help="training images (default 10000)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--down", type=float, default=3.0, help="seconds shard 1 stays dead (default 3)")
    parser.add_argument("--output-dir", default="runs/shard-kill")
    parser.add_argument("--run-timeout", type=float, default=1200.0, help="seconds each run may take")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="more `instdisc train` overrides")
    args = parser.parse_args(argv)
    output = Path(args.output_dir).resolve()
    runs = {}
    for name, kill in (("uninterrupted", False), ("shard killed", True)):
        runs[name] = run_once(output / name.replace(" ", "-"), args.subset, args.epochs, args.overrides, kill,
                              args.down, args.run_timeout)
    plain, killed = runs["uninterrupted"], runs["shard killed"]
    report = {"subset": args.subset, "epochs": args.epochs, "down_s": args.down, "overrides": args.overrides,
              "knn_top1": {name: s["knn_top1"] for name, s in runs.items()},
              "knn_top1_difference_points": 100 * (killed["knn_top1"] - plain["knn_top1"]),
              "wall_seconds": {name: s["wall_seconds"] for name, s in runs.items()},
              "bank_outages": killed["bank_outages"], "bank_outage_details": killed["bank_outage_details"]}
    (output / "shard_kill.json").write_text(json.dumps(report, indent=2))
    for name, summary in runs.items():
        print(f"{name:>14}: kNN top-1 {100 * summary['knn_top1']:.2f} %, top-5 {100 * summary['knn_top5']:.2f} %, "
              f"{summary['bank_outages']} bank outage record(s), {summary['wall_seconds']:.0f} s")
    print(f"difference: {report['knn_top1_difference_points']:+.2f} points of kNN top-1")
    for outage in killed["bank_outage_details"]:
        print(f"  rank {outage['rank']}: shard {outage['shard']} at {outage['address']} {outage['code']} for "
              f"{outage['seconds']:.1f} s, {outage['retries']} retries")
    print(f"written: {output / 'shard_kill.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
