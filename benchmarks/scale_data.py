"""`instdisc scale data`: what reading a Parquet image set costs as it grows.

For each size N it writes (or finds under ``DIR/data/<N>``) a synthetic set in the
Hugging Face layout (`benchmarks.synthetic_parquet`), then runs ``instdisc train`` on
it as a child process with a private local Ray (RAY_ADDRESS removed): a short bounded
run (``--steps`` steps, kNN only at the end), while `benchmarks.memory.sampled`
follows the child's process tree. Streaming should hold a train worker's memory flat in
N; the smallest size is also trained with ``data.stream=false`` (the images decoded
into memory), so what streaming costs in images/s is measured in the same sweep.

Outputs in ``--output-dir``: ``results.parquet`` (one row per run), ``results.md`` (the
table and the two checks), ``memory_vs_images.png`` and ``images_per_sec_vs_images.png``;
each run's folder and log under ``points/``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.args import counts, positive_int
from benchmarks.memory import Peaks, sampled
from benchmarks.report import plot_lines, write_table
from benchmarks.synthetic_parquet import Spec, generate

DEFAULT = dict(sizes="60000,600000,3000000", steps=200, test_images=10_000)
QUICK = dict(sizes="2000,6000", steps=10, test_images=500)
# Short runs that measure the data path: one kNN at the end against the bank, no bank
# refresh; the warm start (one streamed pass) spares the untrained encoder's kNN from
# holding every image's feature on each worker.
RUN_OVERRIDES = "data.name=parquet data.image_size=16 bank.warm_start=true train.refresh_bank_every=0".split()
RUN_OVERRIDES += "eval.every=1000000 eval.source=bank data.test_subset=2000 train.workers=2".split()
STREAM, IN_MEMORY = "stream", "in-memory"
MB = 1e6
COLUMNS = "point images files steps worker_pss_bytes train_workers_pss_bytes bank_pss_bytes other_pss_bytes".split()
COLUMNS += "images_per_sec train_seconds wall_seconds knn_top1 load_avg error".split()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", default="runs/scale-data")
    parser.add_argument("--sizes", type=counts, help=f"comma-separated training set sizes ({DEFAULT})")
    parser.add_argument("--steps", type=positive_int, help="optimizer steps per run")
    parser.add_argument("--test-images", type=positive_int, help="test images of each set")
    parser.add_argument("--timeout", type=positive_int, default=1800, help="seconds one run may take (default 1800)")
    parser.add_argument("--quick", action="store_true", help=f"small sizes and short runs: {QUICK}")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config for every run, e.g. model.width=16")


def watched(command: list[str], log: Path, timeout: float) -> tuple[int | None, float, Peaks]:
    """Run `command` with its output into `log` and its process tree sampled: (exit
    status, or None if it ran past `timeout` and was ended; wall seconds; peaks)."""
    start = time.monotonic()
    environment = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a private Ray, not a shared one
    with open(log, "w") as out:
        # Its own session: on a timeout the whole group (driver, Ray's daemons) is ended.
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=environment, start_new_session=True)
        with sampled(child.pid) as peaks:
            try:
                status = child.wait(timeout)
            except subprocess.TimeoutExpired:
                status = None
                for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
                    os.killpg(child.pid, sig)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        child.wait(grace)
                        break
    return status, time.monotonic() - start, peaks


def train_point(name: str, root: Path, images: int, steps: int, output: Path, overrides: list, timeout) -> dict:
    folder = output / "points" / name
    shutil.rmtree(folder, ignore_errors=True)  # rerunning a name in the same folder would resume it, not measure
    folder.mkdir(parents=True)
    # Absolute: Ray Train runs the workers in a folder of its own.
    stream = "false" if name.startswith(IN_MEMORY) else "true"
    config = [*RUN_OVERRIDES, f"data.root={root.resolve()}", f"train.steps={steps}", f"data.stream={stream}"]
    command = [sys.executable, "-m", "trainer.cli", "train", "--output-dir", str(folder), "--name", name]
    load_before = os.getloadavg()[0]
    status, wall, peaks = watched([*command, *config, *overrides], folder / "log.txt", timeout)
    files = len(list((root / "data").glob("train-*.parquet")))
    row = dict(point=name, images=images, files=files, steps=steps, worker_pss_bytes=peaks.per_worker)
    row |= dict(train_workers_pss_bytes=peaks.roles["train_worker"], bank_pss_bytes=peaks.roles["bank"])
    row |= dict(other_pss_bytes=peaks.roles["other"], total_pss_bytes=peaks.total, samples=peaks.samples)
    row |= dict(wall_seconds=wall, load_avg=max(load_before, os.getloadavg()[0]), error=None)
    summary = folder / "summary.json"
    done = json.loads(summary.read_text()) if status == 0 and summary.exists() else {}
    row |= {key: done.get(key) for key in ("images_per_sec", "train_seconds", "knn_top1")}
    if not done:
        tail = " | ".join((folder / "log.txt").read_text(errors="replace").strip().splitlines()[-5:])
        row["error"] = ("timed out" if status is None else f"exit status {status}") + f": {tail}"
    return row


def checks(rows: list[dict]) -> list[str]:
    """The two targets, each with its numbers and PASS/FAIL, or why it is not measured."""
    streamed = [r for r in rows if r["point"].startswith(STREAM) and not r["error"]]
    memory = next((r for r in rows if r["point"].startswith(IN_MEMORY) and not r["error"]), None)
    lines = [
        "- Train worker memory flat in N: fewer than two streamed sizes finished; not measured",
        "- Streaming as fast as in memory: a run at the smallest size did not finish; not measured",
    ]
    if len(streamed) >= 2:
        small, large = streamed[0], streamed[-1]
        ratio = large["worker_pss_bytes"] / small["worker_pss_bytes"]
        lines[0] = (
            f"- Train worker memory flat in N: peak {large['worker_pss_bytes'] / MB:,.0f} MB at "
            f"{large['images']:,} images against {small['worker_pss_bytes'] / MB:,.0f} MB at "
            f"{small['images']:,}: ratio {ratio:.2f} (target <= 1.2) {'PASS' if ratio <= 1.2 else 'FAIL'}"
        )
    if twin := next((r for r in streamed if memory and r["images"] == memory["images"]), None):
        ratio = twin["images_per_sec"] / memory["images_per_sec"]
        lines[1] = (
            f"- Streaming as fast as in memory ({memory['images']:,} images): {twin['images_per_sec']:,.0f} "
            f"against {memory['images_per_sec']:,.0f} images/s: ratio {ratio:.2f} (target >= 0.9) "
            f"{'PASS' if ratio >= 0.9 else 'FAIL'}"
        )
    return lines


def write_plots(output: Path, rows: list[dict]) -> list[Path]:
    """Peak memory (a train worker; streamed: also the bank and the rest) and images/s against N."""
    done = [dict(r, reader=r["point"].rsplit("-", 1)[0]) for r in rows if not r["error"]]
    parts = dict(worker_pss_bytes="a train worker with its children", bank_pss_bytes="bank", other_pss_bytes="other")
    memory = [
        dict(images=r["images"], MB=r[key] / MB, what=f"{what} ({r['reader']})")
        for r in done
        for key, what in parts.items()
        if r["reader"] == STREAM or key == "worker_pss_bytes"
    ]
    return [
        plot_lines(output / "memory_vs_images.png", memory, "images", "MB", "what", "Peak PSS (Parquet)", logx=True),
        plot_lines(output / "images_per_sec_vs_images.png", done, "images", "images_per_sec", "reader", logx=True),
    ]


def run(args: argparse.Namespace) -> int:
    preset = QUICK if args.quick else DEFAULT
    sizes = sorted(args.sizes or counts(preset["sizes"]))
    steps, test_images = args.steps or preset["steps"], args.test_images or preset["test_images"]
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    for size in sizes:
        print(generate(output / "data" / str(size), Spec(size, test_images)), flush=True)
    plan = [f"{STREAM}-{size}" for size in sizes]
    plan.insert(1, f"{IN_MEMORY}-{sizes[0]}")  # beside its streamed twin, on a like machine
    rows = []
    for name in plan:
        size = int(name.rsplit("-", 1)[1])
        rows.append(train_point(name, output / "data" / str(size), size, steps, output, args.overrides, args.timeout))
        r = rows[-1]
        done = f"{r['images_per_sec']:,.0f} images/s, a train worker's peak {r['worker_pss_bytes'] / MB:,.0f} MB"
        print(f"{name}: " + (f"FAILED: {r['error']}" if r["error"] else done), flush=True)
    notes = [
        f"Each point is one `instdisc train` child process with its own local Ray on a synthetic Parquet set "
        f"(16x16 grayscale PNGs, 10 shape classes), {steps} steps, `{' '.join([*RUN_OVERRIDES, *args.overrides])}`. "
        "Memory is peak PSS sampled every 0.25 s over the child's process tree (`benchmarks.memory`): "
        "worker_pss_bytes is the largest train worker with its loader processes; the bank grows with N by "
        "design (one row per image). images_per_sec is the run's summary.json; load_avg the larger 1-minute "
        f"load before and after the run, on {os.cpu_count()} CPUs.",
    ]
    verdicts = checks(rows)
    notes += ["", "## Checks", "", *verdicts, "", "## Runs"]
    write_table(rows, output, "instdisc scale data", notes, COLUMNS, write_plots(output, rows))
    # A target missed fails the command, as a run that failed does.
    return 1 if any(r["error"] for r in rows) or any(line.endswith("FAIL") for line in verdicts) else 0
