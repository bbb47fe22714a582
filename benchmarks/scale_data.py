"""`instdisc scale data`: what reading a Parquet image set costs as it grows.

For each size N it writes (or finds under ``DIR/data/<N>``) a synthetic set in the
Hugging Face layout (`benchmarks.synthetic_parquet`), then runs ``instdisc train`` on
it as a child process with a private local Ray (RAY_ADDRESS removed), a short bounded
run (``--steps`` steps, no warm start, no bank refresh, kNN only at the end), while
`benchmarks.memory.MemorySampler` follows the child's process tree. Streaming should
hold a train worker's memory flat in N; the smallest size is also trained with
``data.stream=false`` (the same images decoded into memory), so the cost of streaming
in images/s is measured in the same sweep.

Before the training runs it reads and decodes one set's train split once per reader
(`benchmarks.data_readers`: plain pyarrow in one and in two processes, and Ray Data),
each in a child process under the same sampler.

Outputs in ``--output-dir``: ``results.parquet`` (one row per training run),
``readers.parquet``, ``results.md`` (the table, the checks and the reader comparison),
``memory_vs_images.png`` and ``images_per_sec_vs_images.png``; each run's folder and
log under ``points/``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from argparse import ArgumentTypeError
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks.args import comma_list, positive_int

if TYPE_CHECKING:
    from benchmarks.memory import Peaks

DEFAULTS = {"sizes": "60000,600000,3000000", "steps": 200, "test_images": 10_000,
            "readers": "pyarrow,pyarrow-2,ray-data", "reader_size": 600_000}
# Three `instdisc train` runs: each pays Ray's and Ray Train's start (about a minute on
# 2 busy cores here) whatever its size, so the sizes and steps are as small as still says something.
QUICK = {"sizes": "2000,6000", "steps": 10, "test_images": 500, "readers": "pyarrow"}
# Short runs that measure the data path: one kNN at the end against the bank, no bank
# refresh. The warm start stays: it is one streamed pass over the set, whereas without
# it the untrained encoder's kNN is scored "fresh" (trainer.train's `_untrained`), which
# holds every image's feature, N x 128 floats, on each worker.
# kNN over 2,000 test images: each query scans every bank row, 2 minutes for 10,000 at 3M.
RUN_OVERRIDES = ("data.name=parquet", "data.image_size=16", "bank.warm_start=true", "train.refresh_bank_every=0",
                 "eval.every=1000000", "eval.source=bank", "data.test_subset=2000", "train.workers=2")
STREAM, IN_MEMORY = "stream", "in-memory"
MB = 1e6
TABLE_COLUMNS = ("point", "reader", "repeat", "images", "files", "steps", "peak_rss_bytes", "peak_anon_bytes",
                 "train_workers_pss_bytes",
                 "bank_pss_bytes", "other_pss_bytes", "images_per_sec", "train_seconds", "wall_seconds", "knn_top1",
                 "load_avg")
READER_COLUMNS = ("reader", "images", "files", "images_per_sec", "seconds", "startup_seconds", "peak_pss_bytes",
                  "wall_seconds", "load_avg", "error")


def add_scale_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", default="runs/scale-data")
    parser.add_argument("--sizes", help=f"comma-separated training set sizes (default {DEFAULTS['sizes']})")
    parser.add_argument("--steps", type=positive_int, help=f"optimizer steps per run (default {DEFAULTS['steps']})")
    parser.add_argument("--test-images", type=positive_int,
                        help=f"test images of each set, all evaluated once (default {DEFAULTS['test_images']:,})")
    parser.add_argument("--readers", help="reader comparison: comma-separated of pyarrow, pyarrow-2, ray-data, or "
                                          f"'none' (default {DEFAULTS['readers']})")
    parser.add_argument("--reader-size", type=positive_int,
                        help="the set the readers read (default 600,000 if swept, else the smallest size)")
    parser.add_argument("--repeats", type=positive_int, default=1,
                        help="runs of each point, interleaved (default 1); the checks take each size's largest peak "
                             "and mean images/s")
    parser.add_argument("--timeout", type=positive_int, default=1800, help="seconds one run may take (default 1800)")
    parser.add_argument("--quick", action="store_true",
                        help=f"sizes {QUICK['sizes']}, {QUICK['steps']} steps, {QUICK['test_images']} test images, "
                             f"readers {QUICK['readers']}")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="more config for every run, e.g. model.width=16")


def _settings(args: argparse.Namespace) -> dict:
    preset = QUICK if args.quick else DEFAULTS

    def pick(name):
        value = getattr(args, name, None)
        return preset[name] if value is None else value

    sizes = comma_list(pick("sizes"), positive_int)
    readers_text = pick("readers")
    from benchmarks.data_readers import READERS

    readers = [] if readers_text.strip() == "none" else comma_list(readers_text, str.strip)
    unknown = [r for r in readers if r not in READERS]
    if unknown:
        raise ArgumentTypeError(f"--readers: {', '.join(unknown)} not among {', '.join(READERS)}")
    reader_size = args.reader_size or (DEFAULTS["reader_size"] if DEFAULTS["reader_size"] in sizes else min(sizes))
    return {"sizes": sorted(sizes), "steps": pick("steps"), "test_images": pick("test_images"), "readers": readers,
            "reader_size": reader_size, "repeats": getattr(args, "repeats", 1)}


# -- running a child under the sampler -----------------------------------------------

def child_environment() -> dict:
    """This environment without RAY_ADDRESS: each child starts its own local Ray
    instead of joining a cluster that someone else's work shares."""
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def watched(command: list[str], log: Path, timeout: float) -> tuple[int | None, float, Peaks]:
    """Run `command` with its output into `log`, each line led by the seconds since the
    start, and its process tree sampled (the timeline beside the log, memory.csv);
    (exit status or None if it ran past `timeout` and was killed, wall seconds, peaks)."""
    import threading

    from benchmarks.memory import MemorySampler

    start = time.monotonic()
    with open(log, "w", buffering=1) as out:
        # Its own session: on a timeout the whole group (driver, Ray's daemons) is ended.
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=child_environment(),
                                 start_new_session=True, text=True, errors="replace")

        def copy():
            try:
                for line in child.stdout:
                    out.write(f"{time.monotonic() - start:8.1f} {line}")
            except ValueError:  # the log closed after the join below gave up waiting
                pass

        copier = threading.Thread(target=copy, daemon=True)
        copier.start()
        with MemorySampler(child.pid) as sampler:
            try:
                status = child.wait(timeout)
            except subprocess.TimeoutExpired:
                _end_group(child)
                status = None
        copier.join(10)  # the rest of the output; Ray's daemons may hold the pipe a little longer
    sampler.write_timeline(log.with_name("memory.csv") if log.name == "log.txt" else log.with_suffix(".memory.csv"))
    return status, time.monotonic() - start, sampler.peaks


def _end_group(child: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            return
        try:
            child.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(log: Path, lines: int = 5) -> str:
    try:
        text = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:])


# -- the reader comparison ------------------------------------------------------------

def compare_readers(root: Path, readers: list[str], output: Path, timeout: float) -> list[dict]:
    rows = []
    for reader in readers:
        log = output / "readers" / f"{reader}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        load_before = os.getloadavg()[0]
        status, wall, peaks = watched([sys.executable, "-m", "benchmarks.data_readers", "--reader", reader, "--root",
                                       str(root)], log, timeout)
        row = {"reader": reader, "peak_pss_bytes": peaks.total, "wall_seconds": wall, "samples": peaks.samples,
               "load_avg": max(load_before, os.getloadavg()[0]), "error": None}
        result = _last_json(log) if status == 0 else None
        if result is None:
            row["error"] = "timed out" if status is None else f"exit status {status}: {_tail(log)}"
        else:
            row.update({k: result[k] for k in ("images", "files", "images_per_sec", "seconds", "startup_seconds")})
        rows.append(row)
        print(_reader_line(row), flush=True)
    return rows


def _last_json(log: Path) -> dict | None:
    for line in reversed(log.read_text(errors="replace").splitlines()):
        line = line.strip().partition(" ")[2]  # after the seconds `watched` put first
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def _reader_line(row: dict) -> str:
    if row["error"]:
        return f"reader {row['reader']}: FAILED: {row['error']}"
    return (f"reader {row['reader']}: {row['images']:,} images at {row['images_per_sec']:,.0f} images/s "
            f"({row['startup_seconds']:.1f} s start-up), peak PSS {row['peak_pss_bytes'] / MB:,.0f} MB")


# -- the training runs ----------------------------------------------------------------

def train_point(name: str, reader: str, data_root: Path, images: int, files: int, steps: int, output: Path,
                overrides: list[str], timeout: float) -> dict:
    folder = output / "points" / name
    shutil.rmtree(folder, ignore_errors=True)  # rerunning a name in the same folder would resume it, not measure
    folder.mkdir(parents=True)
    # Absolute: Ray Train runs the workers in a folder of its own, where a relative root is not found.
    config = [*RUN_OVERRIDES, f"data.root={data_root.resolve()}", f"train.steps={steps}",
              f"data.stream={'true' if reader == STREAM else 'false'}", *overrides]
    command = [sys.executable, "-m", "trainer.cli", "train", "--output-dir", str(folder), "--name", name, *config]
    (folder / "command.json").write_text(json.dumps(command, indent=2))
    load_before = os.getloadavg()[0]
    status, wall, peaks = watched(command, folder / "log.txt", timeout)
    row = {"point": name, "reader": reader, "images": images, "files": files, "steps": steps,
           "peak_rss_bytes": peaks.per_worker, "peak_anon_bytes": peaks.per_worker_anon,
           "train_workers_pss_bytes": peaks.roles["train_worker"],
           "bank_pss_bytes": peaks.roles["bank"], "other_pss_bytes": peaks.roles["other"],
           "total_pss_bytes": peaks.total, "train_worker_peaks": sorted(peaks.workers.values(), reverse=True),
           "samples": peaks.samples, "wall_seconds": wall, "load_avg": max(load_before, os.getloadavg()[0]),
           "images_per_sec": None, "train_seconds": None, "knn_top1": None, "error": None}
    summary_path = folder / "summary.json"
    if status == 0 and summary_path.exists():
        summary = json.loads(summary_path.read_text())
        row.update(images_per_sec=summary["images_per_sec"], train_seconds=summary["train_seconds"],
                   knn_top1=summary["knn_top1"])
    else:
        row["error"] = ("timed out" if status is None else f"exit status {status}") + f": {_tail(folder / 'log.txt')}"
    return row


def _point_line(row: dict) -> str:
    if row["error"]:
        return f"{row['point']}: FAILED: {row['error']}"
    return (f"{row['point']}: {row['images_per_sec']:,.0f} images/s, train worker peak "
            f"{row['peak_rss_bytes'] / MB:,.0f} MB (all train workers {row['train_workers_pss_bytes'] / MB:,.0f} MB, "
            f"bank {row['bank_pss_bytes'] / MB:,.0f} MB, other {row['other_pss_bytes'] / MB:,.0f} MB), "
            f"{row['wall_seconds']:.0f} s")


# -- what the numbers say -------------------------------------------------------------

def per_size(rows: list[dict], reader: str) -> list[dict]:
    """One entry per size of `reader`'s finished runs: the largest peaks and the mean
    images/s over its repeats, and how many runs that is; smallest size first."""
    sizes: dict[int, list[dict]] = {}
    for r in rows:
        if r["reader"] == reader and not r["error"]:
            sizes.setdefault(r["images"], []).append(r)
    return [{"images": n, "runs": len(runs), "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs),
             "peak_anon_bytes": max(r["peak_anon_bytes"] for r in runs),
             "images_per_sec": sum(r["images_per_sec"] for r in runs) / len(runs)}
            for n, runs in sorted(sizes.items())]


def _runs(entry: dict) -> str:
    return "" if entry["runs"] == 1 else f" (largest of {entry['runs']} runs)"


def checks(rows: list[dict]) -> list[str]:
    """The two targets, each with its numbers and PASS/FAIL (or why it cannot be said)."""
    lines = []
    streamed = per_size(rows, STREAM)
    if len(streamed) >= 2:
        small, large = streamed[0], streamed[-1]
        ratio = large["peak_rss_bytes"] / small["peak_rss_bytes"]
        anon = large["peak_anon_bytes"] / small["peak_anon_bytes"]
        lines.append(f"- Train worker memory flat in N: peak {large['peak_rss_bytes'] / MB:,.0f} MB at "
                     f"{large['images']:,} images{_runs(large)} against {small['peak_rss_bytes'] / MB:,.0f} MB at "
                     f"{small['images']:,}{_runs(small)}: ratio {ratio:.2f} (target <= 1.2) "
                     f"{'PASS' if ratio <= 1.2 else 'FAIL'}; without mapped files "
                     f"{large['peak_anon_bytes'] / MB:,.0f} MB against {small['peak_anon_bytes'] / MB:,.0f} MB: "
                     f"ratio {anon:.2f}")
    else:
        lines.append("- Train worker memory flat in N: fewer than two streamed sizes finished; not measured")
    memory = next(iter(per_size(rows, IN_MEMORY)), None)
    stream = next((r for r in streamed if memory and r["images"] == memory["images"]), None)
    if memory and stream:
        ratio = stream["images_per_sec"] / memory["images_per_sec"]
        mean = "" if stream["runs"] == memory["runs"] == 1 else " (means over the runs)"
        lines.append(f"- Streaming as fast as in memory ({memory['images']:,} images): {stream['images_per_sec']:,.0f} "
                     f"against {memory['images_per_sec']:,.0f} images/s{mean}: ratio {ratio:.2f} (target >= 0.9) "
                     f"{'PASS' if ratio >= 0.9 else 'FAIL'}")
    else:
        lines.append("- Streaming as fast as in memory: the streamed or the in-memory run at the smallest size "
                     "did not finish; not measured")
    return lines


def reader_section(rows: list[dict], size: int) -> list[str]:
    from benchmarks.report import markdown

    table = markdown(rows, "x", columns=READER_COLUMNS).split("\n", 2)[2]  # without its title
    lines = ["## Readers", "",
             (f"The train split of the {size:,}-image set read and decoded once per reader, each in a child "
              "process, into uint8 (batch, 3, 16, 16) tensors in batches of 128 by the same PIL decode "
              "(`benchmarks.data_readers`). `pyarrow`: one process, row group by row group; `pyarrow-2`: two "
              "DataLoader worker processes taking alternate row groups; `ray-data`: `ray.data.read_parquet` + "
              f"`map_batches` + `iter_torch_batches` on a private local Ray given all {os.cpu_count()} CPUs. "
              "images_per_sec counts from the first batch asked for to the last received; startup_seconds is "
              "before that (Ray's start for `ray-data`). peak_pss_bytes: the peak of the child's whole process "
              "tree (for `ray-data` its raylet, GCS, workers and object store too)."), "", table]
    done = {r["reader"]: r for r in rows if not r["error"]}
    if "ray-data" in done:
        for other in ("pyarrow-2", "pyarrow"):
            if other in done:
                ray, plain = done["ray-data"], done[other]
                lines.append(f"Ray Data reads at {ray['images_per_sec'] / plain['images_per_sec']:.2f}x the speed "
                             f"of `{other}` with {ray['peak_pss_bytes'] / plain['peak_pss_bytes']:.1f}x its peak "
                             f"memory (and {ray['startup_seconds']:.0f} s to start).")
                break
    return lines


def notes(rows: list[dict], settings: dict, overrides: list[str], generation: list[str]) -> list[str]:
    from benchmarks.bank_grid import GIB, memory_available

    return [
        (f"Each point is one `instdisc train` child process with its own local Ray on a synthetic Parquet set "
         f"(`benchmarks.synthetic_parquet`: 16x16 grayscale PNGs, 10 shape classes, 100,000 rows per file in row "
         f"groups of 10,000, Hugging Face layout), {settings['steps']} steps of 128 images, "
         f"`{' '.join(RUN_OVERRIDES + tuple(overrides))}`, a warm start (one pass over the set) and a kNN of "
         f"{min(2000, settings['test_images']):,} of the {settings['test_images']:,} test images against the bank "
         "before and after training. "
         "data.loader_workers is the config's default: 1 decoding process per train worker when streaming, 0 when "
         "the split is held in memory."),
        "",
        ("Memory is PSS from /proc/PID/smaps_rollup, sampled every 0.25 s over the child's process tree "
         "(`benchmarks.memory`; each run's timeline is `points/<point>/memory.csv`, beside its log whose lines "
         "start with the same seconds; a spike shorter than a sample can be missed); shared pages (the object "
         "store, a loader process's copy-on-write pages) are split between the processes that map them. "
         "**peak_rss_bytes** is the largest, over the train workers (`ray::RayTrainWorker` processes), of one "
         "worker's peak of its own PSS plus its descendants' (its forkserver and loader processes) summed at each "
         "sample; peak_anon_bytes the same of anonymous and shared memory only "
         "(Pss_Anon + Pss_Shmem: what the process allocated, without the libraries' code, whose share of the page "
         "cache moves with how many other processes on the machine map the same files); train_workers_pss_bytes "
         "is the peak of all train workers together; bank_pss_bytes of the bank shard actors "
         "(`ray::BankShardActor`) together, which grow with N by design (one row per image); other_pss_bytes of "
         "everything else in the tree (the driver, raylet, GCS, idle Ray workers, Ray Train's controller)."),
        "",
        ("images_per_sec is the run's summary.json: training images over the epoch's seconds, first batch's wait "
         "included. wall_seconds is the whole child, Ray's start included; load_avg the larger 1-minute load "
         "average before and after the run (the 2 cores are shared with other work)."),
        "",
        (f"Each point ran {settings['repeats']} time(s), the repeats interleaved; the checks take each size's "
         "largest peak and mean images/s." if settings["repeats"] > 1 else "Each point ran once."),
        "",
        f"Machine: {os.cpu_count()} CPUs, MemAvailable {memory_available() / GIB:.1f} GiB at the end.",
        "",
        "Data generation: " + "; ".join(generation) + ".",
        "",
        "## Checks",
        "",
        *checks(rows),
        "",
        "## Runs",
    ]


def write_plots(output: Path, rows: list[dict]) -> list[Path]:
    """Memory and images/s against N; with repeats, each size's largest peak and mean images/s."""
    from benchmarks.report import plot_lines

    sizes: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        if not r["error"]:
            sizes.setdefault((r["reader"], r["images"]), []).append(r)
    memory, speed = [], []
    for (reader, images), runs in sizes.items():
        def peak(key):
            return max(r[key] for r in runs) / MB

        label = "train worker, peak with its children" + ("" if reader == STREAM else f" ({reader})")
        memory.append({"images": images, "MB": peak("peak_rss_bytes"), "what": label})
        if reader == STREAM:
            memory += [{"images": images, "MB": peak("bank_pss_bytes"), "what": "bank shards, together"},
                       {"images": images, "MB": peak("other_pss_bytes"), "what": "other (driver, raylet, ...)"}]
        speed.append({"images": images, "reader": reader,
                      "images_per_sec": sum(r["images_per_sec"] for r in runs) / len(runs)})
    return [
        plot_lines(output / "memory_vs_images.png", memory, "images", "MB", "what", logx=True,
                   title="Peak PSS vs training images (Parquet)", xlabel="training images (log scale)",
                   ylabel="peak PSS (MB)"),
        plot_lines(output / "images_per_sec_vs_images.png", speed, "images", "images_per_sec", "reader", logx=True,
                   title="Training images/s vs training images (Parquet)", xlabel="training images (log scale)",
                   ylabel="images/s"),
    ]


# -- the command ----------------------------------------------------------------------

def prepare_data(output: Path, sizes: list[int], test_images: int) -> tuple[dict[int, dict], list[str]]:
    from benchmarks.synthetic_parquet import Spec, generate

    manifests, lines = {}, []
    for size in sizes:
        manifests[size] = generate(output / "data" / str(size), Spec(size, test_images))
        manifest = manifests[size]
        lines.append(f"{size:,} + {test_images:,} images in {len(manifest['files'])} files: "
                     f"{manifest['seconds']:.1f} s with {manifest['processes']} processes")
    return manifests, lines


def run_scale_data(args: argparse.Namespace) -> int:
    try:
        settings = _settings(args)
    except ArgumentTypeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    sizes = settings["sizes"]
    wanted = sorted(set(sizes) | ({settings["reader_size"]} if settings["readers"] else set()))
    manifests, generation = prepare_data(output, wanted, settings["test_images"])

    readers = []
    if settings["readers"]:
        readers = compare_readers(output / "data" / str(settings["reader_size"]), settings["readers"], output,
                                  args.timeout)

    def files(size):
        return sum(1 for name in manifests[size]["files"] if name.startswith("train-"))

    plan = [(STREAM, size) for size in sizes]
    plan.insert(1, (IN_MEMORY, sizes[0]))  # beside its streamed twin, on a like machine
    rows = []
    for repeat in range(args.repeats):  # interleaved: a slow spell of the shared machine hits every point alike
        for reader, size in plan:
            name = f"{reader}-{size}" + (f"-r{repeat + 1}" if args.repeats > 1 else "")
            rows.append(train_point(name, reader, output / "data" / str(size), size, files(size), settings["steps"],
                                    output, args.overrides, args.timeout) | {"repeat": repeat + 1})
            print(_point_line(rows[-1]), flush=True)

    from benchmarks.report import write_table

    parquet, markdown_path = write_table(rows, output, "instdisc scale data",
                                         notes(rows, settings, args.overrides, generation), TABLE_COLUMNS)
    if readers:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(readers), output / "readers.parquet")
        with open(markdown_path, "a") as fh:
            fh.write("\n" + "\n".join(reader_section(readers, settings["reader_size"])) + "\n")
    plots = write_plots(output, rows)
    print(markdown_path.read_text())
    print(f"wrote {parquet}, {markdown_path}, " + ", ".join(map(str, plots)))
    return 1 if any(r["error"] for r in rows + readers) else 0
