"""`instdisc scale train`: the paper's ablation on real data, kNN top-1 against the
number of negatives K of NCE and of InfoNCE (the sampled softmax), with the exact full
softmax as their limit, and against the bank size (training subsets: the bank holds
one row per training image).

Each point is one `trainer.launch.launch` run into ``DIR/points/<point>/`` (its log
in ``log.txt``, its resolved config in ``point.json``). A point whose run finished
before with the same config is read back, not trained again, so an interrupted sweep
resumes; a point stopped mid-run resumes from its last epoch checkpoint.

Top-level imports stay light: the CLI parser is built without torch or Ray.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks.args import positive_int

if TYPE_CHECKING:
    from trainer.config import Config

SOFTMAX = "softmax"  # in place of a number of negatives: the exact full softmax
ALL = "all"  # in place of a number of training images: the whole training set
# Set by the sweep itself; a trailing key=value for one of them would silently lose.
SWEPT_KEYS = ("loss.kind", "loss.negatives", "data.subset", "train.epochs")
POINT_CONFIG = "point.json"


@dataclass(frozen=True)
class Grid:
    """What the sweep trains: every K of `negatives` (NCE, or 'softmax') and of
    `infonce_negatives` on `fixed_subset` images, and every bank size of `subsets` with
    NCE's `fixed_negatives`; `overrides` come before the user's."""

    negatives: tuple[int | str, ...]
    fixed_subset: int | str
    subsets: tuple[int | str, ...]
    fixed_negatives: int | str
    epochs: int
    overrides: tuple[str, ...] = ()
    infonce_negatives: tuple[int, ...] = ()


# K is swept on the whole training set: on a 20,000-image subset NCE stayed below the
# untrained encoder at every K after 3 epochs (68.9-74.1 % against 78.6 %), which says
# nothing about K. The default without InfoNCE (8 runs, 1M training images) took 24
# minutes on 2 cores; InfoNCE's three K add three runs on all 60k images.
GRIDS = {
    "default": Grid(negatives=(1, 16, 256, 4096, SOFTMAX), fixed_subset=ALL,
                    subsets=(5000, 10000, 20000, ALL), fixed_negatives=4096, epochs=3,
                    infonce_negatives=(256, 4096, 16384)),
    "quick": Grid(negatives=(16, SOFTMAX), fixed_subset=2000, subsets=(1000, 2000), fixed_negatives=16, epochs=1,
                  overrides=("data.test_subset=1000",)),
}


@dataclass(frozen=True)
class TrainPoint:
    """One training run: a loss (NCE or InfoNCE with K negatives, or the exact softmax)
    on `rows` images."""

    negatives: int | None  # None: the exact softmax over every bank row
    rows: int
    epochs: int
    sampled: str = "nce"   # the loss of a point with K negatives: nce | infonce

    @property
    def loss(self) -> str:
        return SOFTMAX if self.negatives is None else self.sampled

    @property
    def name(self) -> str:
        loss = SOFTMAX if self.negatives is None else f"{self.sampled}-k{self.negatives}"
        return f"{loss}-rows{self.rows}-e{self.epochs}"

    def overrides(self, train_rows: int) -> list[str]:
        """The swept keys; data.subset=0 (all images) when the point covers the dataset."""
        subset = self.rows if self.rows < train_rows else 0
        if self.negatives is None:
            return ["loss.kind=softmax", f"data.subset={subset}", f"train.epochs={self.epochs}"]
        return [f"loss.kind={self.sampled}", f"loss.negatives={self.negatives}", f"data.subset={subset}",
                f"train.epochs={self.epochs}"]


# -- arguments -------------------------------------------------------------------


def _negatives(text: str) -> int | str:
    return SOFTMAX if text.strip().lower() == SOFTMAX else positive_int(text)


def _negatives_list(text: str) -> tuple:
    return tuple(_negatives(item) for item in text.split(",") if item.strip())


def _counts_list(text: str) -> tuple[int, ...]:
    return tuple(positive_int(item) for item in text.split(",") if item.strip())


def _rows(text: str) -> int | str:
    return ALL if text.strip().lower() == ALL else positive_int(text)


def _rows_list(text: str) -> tuple[int | str, ...]:
    return tuple(_rows(item) for item in text.split(",") if item.strip())


def _listed(values) -> str:
    return ",".join(map(str, values))


def _epochs(count: int) -> str:
    return f"{count} epoch" + ("" if count == 1 else "s")


def _loss_label(negatives: int | str, sampled: str = "nce") -> str:
    if negatives == SOFTMAX:
        return "the exact softmax"
    return f"{'InfoNCE' if sampled == 'infonce' else 'NCE'}, K = {negatives}"


def add_scale_train_arguments(parser: argparse.ArgumentParser) -> None:
    default, quick = GRIDS["default"], GRIDS["quick"]
    parser.description = (
        "Train one run per point and report weighted-kNN top-1 against the number of negatives K of NCE and of "
        "InfoNCE (with the exact softmax as the limit) and against the bank size. The default grid, "
        f"{_epochs(default.epochs)} per run (NCE K = {_listed(default.negatives)} and InfoNCE K = "
        f"{_listed(default.infonce_negatives)} on {default.fixed_subset} training images; "
        f"{_listed(default.subsets)} images with NCE K = {default.fixed_negatives}), takes about 35 minutes on "
        "2 CPU cores with the fashion-mnist config. Points already finished in --output-dir are reused.")
    parser.add_argument("--config", default="fashion-mnist",
                        help="a YAML file, or a shipped config: fashion-mnist (default), cifar10, imagenet")
    parser.add_argument("--output-dir", default="runs/scale-train",
                        help="results.parquet, results.md, the plots, and points/<point>/ with each run's outputs")
    parser.add_argument("--negatives", type=_negatives_list, default=None, metavar="K,...",
                        help=f"NCE negatives to sweep; 'softmax' adds the exact full softmax; '' skips this sweep "
                             f"(default {_listed(default.negatives)}; --quick {_listed(quick.negatives)})")
    parser.add_argument("--infonce-negatives", type=_counts_list, default=None, metavar="K,...",
                        help=f"InfoNCE negatives to sweep beside NCE's, on the same images; '' skips them "
                             f"(default {_listed(default.infonce_negatives)}; --quick "
                             f"{_listed(quick.infonce_negatives) or 'none'})")
    parser.add_argument("--fixed-subset", type=_rows, default=None, metavar="ROWS",
                        help=f"training images (= bank rows) while K varies, or 'all' "
                             f"(default {default.fixed_subset}; --quick {quick.fixed_subset})")
    parser.add_argument("--subsets", type=_rows_list, default=None, metavar="ROWS,...",
                        help=f"bank sizes to sweep (training subsets; 'all' or beyond the dataset: all of it); '' "
                             f"skips this sweep (default {_listed(default.subsets)}; --quick {_listed(quick.subsets)})")
    parser.add_argument("--fixed-negatives", type=_negatives, default=None, metavar="K",
                        help=f"K (or 'softmax') while the bank size varies "
                             f"(default {default.fixed_negatives}; --quick {quick.fixed_negatives})")
    parser.add_argument("--epochs", type=positive_int, default=None,
                        help=f"epochs of every run (default {default.epochs}; --quick {quick.epochs})")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny grid for a smoke check (a minute or two): "
                             + " ".join(quick.overrides) + ", and the --quick values above")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides for every point, e.g. train.lr=0.03 (not "
                             + ", ".join(SWEPT_KEYS) + ": the sweep sets those)")


def resolve_grid(args) -> Grid:
    """The --quick or default grid, with each grid argument given on the command line."""
    base = GRIDS["quick" if args.quick else "default"]
    given = {field.name: getattr(args, field.name) for field in dataclasses.fields(Grid)
             if field.name != "overrides" and getattr(args, field.name, None) is not None}
    return dataclasses.replace(base, **given)


def check_overrides(overrides: list[str]) -> None:
    from trainer.config import ConfigError

    for pair in overrides:
        key = pair.split("=", 1)[0].strip()
        if key in SWEPT_KEYS:
            raise ConfigError(f"{key} is set by the sweep; use --negatives, --infonce-negatives, --fixed-negatives, "
                              "--subsets, "
                              "--fixed-subset and --epochs instead")


# -- the plan ---------------------------------------------------------------------


def plan_points(grid: Grid, train_rows: int) -> dict[TrainPoint, list[str]]:
    """Each distinct point, in sweep order, with the sweeps it belongs to; subsets at or
    beyond the dataset's size are the whole dataset, and a point two sweeps share runs once."""
    from trainer.config import ConfigError

    def point(negatives: int | str, subset: int | str, sampled: str = "nce") -> TrainPoint:
        rows = _images(subset, train_rows)
        if negatives != SOFTMAX and negatives > rows:
            raise ConfigError(f"K = {negatives} negatives exceeds the {rows} training images (bank rows) "
                              "of that point; lower it or train on more images")
        return TrainPoint(None if negatives == SOFTMAX else negatives, rows, grid.epochs, sampled)

    plan: dict[TrainPoint, list[str]] = {}

    def add(member: TrainPoint, sweep: str) -> None:
        sweeps = plan.setdefault(member, [])
        if sweep not in sweeps:
            sweeps.append(sweep)

    for negatives in grid.negatives:
        add(point(negatives, grid.fixed_subset), "negatives")
    for negatives in grid.infonce_negatives:
        add(point(negatives, grid.fixed_subset, "infonce"), "negatives")
    for rows in grid.subsets:
        add(point(grid.fixed_negatives, rows), "bank size")
    if not plan:
        raise ConfigError("nothing to run: --negatives, --infonce-negatives and --subsets are all empty")
    return plan


def _images(subset: int | str, train_rows: int) -> int:
    return train_rows if subset == ALL else min(subset, train_rows)


def dataset_sizes(config: Config) -> tuple[int, int]:
    """Training images and evaluated test images; read once, so that a grid the dataset
    cannot hold fails before the first run instead of in the middle of the sweep."""
    from trainer.data import load_dataset

    d = config.data
    train = len(load_dataset(d.name, d.root, train=True, download=d.download, image_size=d.image_size))
    test = len(load_dataset(d.name, d.root, train=False, download=d.download, image_size=d.image_size))
    return train, min(test, d.test_subset) if d.test_subset else test


def point_config(config_path: Path, grid: Grid, overrides: list[str], point: TrainPoint, train_rows: int) -> Config:
    from trainer.config import load_config

    return load_config(config_path, [*grid.overrides, *overrides, *point.overrides(train_rows)])


def finished_summary(folder: Path, config: Config, point: TrainPoint) -> dict | None:
    """The summary of an earlier run of this point, if it finished every epoch; an earlier
    run with another config is an error: resuming it would mix two configs."""
    from trainer.config import ConfigError

    recorded = folder / POINT_CONFIG
    if not recorded.exists():
        return None
    if json.loads(recorded.read_text()) != config.to_dict():
        raise ConfigError(f"{folder} was trained with another config (different overrides or config file); "
                          "use another --output-dir or delete that folder")
    summary_path = folder / "summary.json"
    if not summary_path.exists():
        return None
    summary = json.loads(summary_path.read_text())
    return summary if summary["epochs"] == point.epochs else None


# -- running ----------------------------------------------------------------------


def train_point(config: Config, folder: Path, point: TrainPoint) -> dict:
    """One launch, its console output kept in the point's log.txt (the sweep's console
    shows the progress bar and one line per point); line-buffered, so `tail -f` follows it."""
    from trainer.launch import launch

    folder.mkdir(parents=True, exist_ok=True)
    (folder / POINT_CONFIG).write_text(json.dumps(config.to_dict(), indent=2))
    with open(folder / "log.txt", "a", buffering=1) as log, redirect_stdout(log), redirect_stderr(log):
        return launch(config, folder, run_name=point.name)


def result_row(point: TrainPoint, sweeps: list[str], summary: dict | None, error: str | None = None) -> dict:
    """One row of results.parquet; accuracies are fractions, None for a failed point."""
    done = summary if summary is not None and error is None else {}
    top1, untrained = done.get("knn_top1"), done.get("knn_top1_untrained")
    return {
        "point": point.name, "sweeps": "+".join(sweeps), "loss": point.loss, "negatives": point.negatives,
        "bank_rows": point.rows, "epochs": point.epochs,
        "knn_top1": top1, "knn_top5": done.get("knn_top5"), "knn_top1_untrained": untrained,
        "knn_top1_gain": None if top1 is None or untrained is None else top1 - untrained,
        "images_per_sec": done.get("images_per_sec"), "train_seconds": done.get("train_seconds"),
        "wall_seconds": done.get("wall_seconds"), "final_loss": done.get("final_loss"), "steps": done.get("steps"),
        "error": error,
    }


def obtain_point(point: TrainPoint, config: Config, folder: Path) -> tuple[dict | None, str | None, bool]:
    """(summary, error, reused): read back a finished run, or train it; a run that stops
    (e.g. a non-finite loss) gives an error instead, so the sweep can go on."""
    from trainer.launch import TrainingStopped

    summary = finished_summary(folder, config, point)
    if summary is not None:
        return summary, None, True
    try:
        return train_point(config, folder, point), None, False
    except TrainingStopped as stopped:
        return None, f"{stopped} (log: {folder / 'log.txt'})", False


def run_points(plan: dict[TrainPoint, list[str]], configs: dict[TrainPoint, Config],
               output: Path) -> tuple[list[dict], int]:
    """Every point under one progress bar weighted by training images; returns the rows
    and how many points were read back from earlier runs."""
    from tqdm import tqdm

    rows, reused = [], 0
    total = sum(point.rows * point.epochs for point in plan)
    with tqdm(total=total, unit="img", unit_scale=True, desc="scale train", file=sys.stderr) as bar:
        for point, sweeps in plan.items():
            bar.set_postfix_str(point.name)
            summary, error, was_reused = obtain_point(point, configs[point], output / "points" / point.name)
            reused += was_reused
            rows.append(result_row(point, sweeps, summary, error))
            bar.update(point.rows * point.epochs)
            bar.write(_point_line(rows[-1], was_reused))
    return rows, reused


def _point_line(row: dict, reused: bool) -> str:
    if row["error"]:
        return f"{row['point']}: FAILED: {row['error']}"
    untrained = row["knn_top1_untrained"]
    before = "" if untrained is None else f" (untrained {100 * untrained:.2f}%)"
    return (f"{row['point']}: kNN top-1 {100 * row['knn_top1']:.2f}%{before}, "
            f"{row['images_per_sec']:,.0f} img/s{' (reused)' if reused else ''}")


# -- outputs ----------------------------------------------------------------------


def _level(value: float, span: tuple[int, int], x: str, label: str) -> list[dict]:
    """A horizontal line at `value` across `span` of the x axis, as two plot rows."""
    return [{x: end, "top1": 100 * value, "encoder": label} for end in span]


def plot_against_negatives(rows: list[dict], path: Path, dataset: str) -> Path | None:
    """kNN top-1 against K on a log axis. The exact softmax has no K (every one of the N
    bank rows is a negative): it and the untrained encoder are horizontal lines from the
    smallest K to N, so the softmax reads as the limit the NCE line heads for."""
    from benchmarks.report import plot_lines

    swept = [r for r in rows if "negatives" in r["sweeps"] and r["knn_top1"] is not None]
    if not swept:
        return None
    first = swept[0]
    sampled = [r for r in swept if r["negatives"] is not None]
    span = (min((r["negatives"] for r in sampled), default=first["bank_rows"]), first["bank_rows"])
    lines = [{"K": r["negatives"], "top1": 100 * r["knn_top1"],
              "encoder": f"trained with {'InfoNCE' if r['loss'] == 'infonce' else 'NCE'}"} for r in sampled]
    for r in swept:
        if r["negatives"] is None:
            lines += _level(r["knn_top1"], span, "K", "trained with the exact softmax (all N rows)")
    if first["knn_top1_untrained"] is not None:
        lines += _level(first["knn_top1_untrained"], span, "K", "untrained")
    return plot_lines(path, lines, x="K", y="top1", series="encoder", logx=True,
                      title=f"{dataset}: kNN vs negatives (N = {first['bank_rows']:,} images, "
                            f"{_epochs(first['epochs'])})",
                      xlabel="negatives K (log scale)", ylabel="weighted kNN top-1 (%)")


def plot_against_bank_size(rows: list[dict], path: Path, dataset: str) -> Path | None:
    """kNN top-1 against bank rows (= training images) on a log axis, trained and
    untrained: the bank is also the kNN index, so the untrained line shows what the
    index size alone does."""
    from benchmarks.report import plot_lines

    swept = [r for r in rows if "bank size" in r["sweeps"] and r["knn_top1"] is not None]
    if not swept:
        return None
    first = swept[0]
    trained = f"trained with {_loss_label(first['negatives'] or SOFTMAX)}"
    lines = [{"rows": r["bank_rows"], "top1": 100 * r["knn_top1"], "encoder": trained} for r in swept]
    lines += [{"rows": r["bank_rows"], "top1": 100 * r["knn_top1_untrained"], "encoder": "untrained"}
              for r in swept if r["knn_top1_untrained"] is not None]
    return plot_lines(path, lines, x="rows", y="top1", series="encoder", logx=True,
                      title=f"{dataset}: kNN vs bank size ({_epochs(first['epochs'])})",
                      xlabel="bank rows = training images (log scale)", ylabel="weighted kNN top-1 (%)")


TABLE_COLUMNS = ["point", "sweeps", "negatives", "bank_rows", "epochs", "knn_top1", "knn_top5", "knn_top1_untrained",
                 "knn_top1_gain", "images_per_sec", "train_seconds", "final_loss"]


def table_notes(sweep: Sweep, rows: list[dict], reused: int) -> list[str]:
    """What the table needs to be read right: the grid, how kNN was measured, the confounds."""
    grid, config, train_rows = sweep.grid, sweep.base_config, sweep.train_rows
    overrides = [*grid.overrides, *sweep.overrides]
    failed = sum(1 for r in rows if r["error"])
    lines = [
        f"Config `{sweep.config_name}` on {config.data.name}, {_epochs(grid.epochs)} per run"
        + (f", overrides `{' '.join(overrides)}`" if overrides else "") + ".",
        f"Negatives sweep: NCE K = {_listed(grid.negatives) or '(none)'}, InfoNCE K = "
        f"{_listed(grid.infonce_negatives) or '(none)'} on {_images(grid.fixed_subset, train_rows):,} "
        f"images. Bank-size sweep: {_listed(_images(s, train_rows) for s in grid.subsets) or '(none)'} images with "
        f"{_loss_label(grid.fixed_negatives)}.",
        f"Accuracies are fractions: weighted kNN (k = {config.eval.k}, sigma = {config.eval.sigma}) of "
        f"{sweep.test_rows:,} test images against the bank rows, i.e. the run's own training images. A smaller "
        "bank is a smaller kNN index as well as less training data; `knn_top1_untrained` is the untrained encoder "
        "against the same index and `knn_top1_gain` what training added.",
        "Every run trains the same number of epochs, so smaller banks also get fewer steps. images/s is the mean "
        "over epochs on a machine that may have been running other work.",
        f"{reused} of {len(rows)} point(s) were read back from earlier runs in this folder.",
    ]
    if failed:
        lines.append(f"{failed} point(s) failed; see the `error` column.")
    return lines


def write_results(rows: list[dict], output: Path, dataset: str, notes: list[str]) -> list[Path]:
    from benchmarks.report import write_table

    columns = TABLE_COLUMNS + (["error"] if any(r["error"] for r in rows) else [])
    paths = list(write_table(rows, output, f"kNN accuracy vs negatives and bank size ({dataset})", notes, columns))
    for plot, name in ((plot_against_negatives, "knn_vs_negatives.png"),
                       (plot_against_bank_size, "knn_vs_bank_size.png")):
        written = plot(rows, output / name, dataset)
        if written is not None:
            paths.append(written)
    return paths


# -- the command ------------------------------------------------------------------


@dataclass
class Sweep:
    """A checked command: the grid, each point's resolved config, what the notes cite."""

    grid: Grid
    config_name: str
    overrides: list[str]
    base_config: Config
    train_rows: int
    test_rows: int
    plan: dict[TrainPoint, list[str]]
    configs: dict[TrainPoint, Config]


def prepare(args) -> Sweep:
    """Everything that can be wrong with the command, found before the first run."""
    from trainer.config import load_config, resolve_config_path

    grid = resolve_grid(args)
    check_overrides(args.overrides)
    config_path = resolve_config_path(args.config)
    base = load_config(config_path, [*grid.overrides, *args.overrides])
    train_rows, test_rows = dataset_sizes(base)
    plan = plan_points(grid, train_rows)
    configs = {point: point_config(config_path, grid, args.overrides, point, train_rows) for point in plan}
    for point in plan:
        finished_summary(Path(args.output_dir) / "points" / point.name, configs[point], point)
    return Sweep(grid, args.config, list(args.overrides), base, train_rows, test_rows, plan, configs)


def run_scale_train(args) -> int:
    from trainer.config import ConfigError
    from trainer.data import DatasetMissing

    try:
        sweep = prepare(args)
    except (ConfigError, DatasetMissing, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    output = Path(args.output_dir)
    rows, reused = run_points(sweep.plan, sweep.configs, output)
    paths = write_results(rows, output, sweep.base_config.data.name, table_notes(sweep, rows, reused))
    print(paths[1].read_text())
    print("wrote " + ", ".join(map(str, paths)))
    return 1 if any(r["error"] for r in rows) else 0
