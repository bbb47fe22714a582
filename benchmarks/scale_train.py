"""`instdisc scale train`: the paper's ablation on real data. Weighted-kNN top-1 against
the number of negatives K of NCE and of InfoNCE (the sampled softmax), with the exact
full softmax as their limit, and against the bank size (training subsets: the bank
holds one row per training image). Each point is one training run
(`benchmarks.runs`) in ``DIR/points/<point>/``; finished points are read back.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

from benchmarks import runs
from benchmarks.args import positive_int
from benchmarks.report import plot_lines, write_table
from trainer.config import ConfigError, load_config, resolve_config_path
from trainer.data import load_dataset
from trainer.images import DatasetMissing
from trainer.launch import TrainingStopped

SOFTMAX = "softmax"  # in place of a number of negatives: the exact full softmax
ALL = "all"  # in place of a number of training images: the whole training set
SWEPT_KEYS = ("loss.kind", "loss.negatives", "data.subset", "train.epochs")  # an override would silently lose


@dataclass(frozen=True)
class Grid:
    """Every K of `negatives` (NCE, or 'softmax') and of `infonce_negatives` on
    `fixed_subset` images; every bank size of `subsets` with NCE's `fixed_negatives`."""

    negatives: tuple[int | str, ...]
    fixed_subset: int | str
    subsets: tuple[int | str, ...]
    fixed_negatives: int | str
    epochs: int
    infonce_negatives: tuple[int, ...] = ()
    overrides: tuple[str, ...] = ()  # before the user's


# K is swept on the whole training set: on a 20,000-image subset NCE stayed below the
# untrained encoder at every K after 3 epochs, which says nothing about K.
GRIDS = {  # (negatives, fixed_subset, subsets, fixed_negatives, epochs, infonce_negatives, overrides)
    "default": Grid((1, 16, 256, 4096, SOFTMAX), ALL, (5000, 10000, 20000, ALL), 4096, 3, (256, 4096, 16384)),
    "quick": Grid((16, SOFTMAX), 2000, (1000, 2000), 16, 1, (), ("data.test_subset=1000",)),
}


@dataclass(frozen=True)
class TrainPoint:
    """One run: NCE or InfoNCE with K negatives, or the exact softmax (K None), on `rows` images."""

    negatives: int | None
    rows: int
    epochs: int
    sampled: str = "nce"

    @property
    def loss(self) -> str:
        return SOFTMAX if self.negatives is None else self.sampled

    @property
    def name(self) -> str:
        loss = SOFTMAX if self.negatives is None else f"{self.sampled}-k{self.negatives}"
        return f"{loss}-rows{self.rows}-e{self.epochs}"

    def overrides(self, train_rows: int) -> list[str]:
        subset = self.rows if self.rows < train_rows else 0
        keys = [f"loss.kind={self.loss}", f"data.subset={subset}", f"train.epochs={self.epochs}"]
        return keys if self.negatives is None else [*keys, f"loss.negatives={self.negatives}"]


def _count_or(word: str):
    return lambda text: word if text.strip().lower() == word else positive_int(text)


def _listed(kind):
    return lambda text: tuple(kind(item) for item in text.split(",") if item.strip())


_negatives, _rows = _count_or(SOFTMAX), _count_or(ALL)


GRID_OPTIONS = [  # (flag, type, metavar, help); each defaults to the grid's (--quick: the quick grid's)
    ("--negatives", _listed(_negatives), "K,...", "NCE negatives to sweep; 'softmax' adds the exact softmax; '' skips"),
    ("--infonce-negatives", _listed(positive_int), "K,...", "InfoNCE negatives, on the same images"),
    ("--fixed-subset", _rows, "ROWS", "training images while K varies, or 'all'"),
    ("--subsets", _listed(_rows), "ROWS,...", "bank sizes (training subsets, or 'all'); '' skips"),
    ("--fixed-negatives", _negatives, "K", "K (or 'softmax') while the bank size varies"),
    ("--epochs", positive_int, None, "epochs of every run"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument("--config", default="fashion-mnist", help="a YAML file or a shipped config")
    parser.add_argument("--output-dir", default="runs/scale-train", help="results, plots and points/<point>/")
    for flag, kind, metavar, text in GRID_OPTIONS:
        field = flag[2:].replace("-", "_")
        default = f"(default {getattr(GRIDS['default'], field)}; --quick {getattr(GRIDS['quick'], field)})"
        parser.add_argument(flag, type=kind, metavar=metavar, help=f"{text} {default}")
    parser.add_argument("--quick", action="store_true", help="a tiny grid for a smoke check")
    keys = ", ".join(SWEPT_KEYS)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=f"config for every point (not {keys})")


def resolve_grid(args: argparse.Namespace) -> Grid:
    """The --quick or default grid, with each grid option given on the command line."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Grid) if getattr(args, f.name, None) is not None}
    for pair in args.overrides:
        if (key := pair.split("=", 1)[0].strip()) in SWEPT_KEYS:
            raise ConfigError(f"{key} is set by the sweep; use its options (--negatives, --subsets, ...) instead")
    return dataclasses.replace(GRIDS["quick" if args.quick else "default"], **given)


def plan_points(grid: Grid, train_rows: int) -> dict[TrainPoint, list[str]]:
    """Each distinct point in sweep order with the sweeps it belongs to; subsets at or
    beyond the dataset's size are all of it, and a point two sweeps share runs once."""
    plan: dict[TrainPoint, list[str]] = {}

    def add(negatives: int | str, subset: int | str, sweep: str, sampled: str = "nce") -> None:
        rows = train_rows if subset == ALL else min(subset, train_rows)
        if negatives != SOFTMAX and negatives > rows:
            raise ConfigError(f"K = {negatives} negatives exceeds the {rows} training images (bank rows) of that point")
        point = TrainPoint(None if negatives == SOFTMAX else negatives, rows, grid.epochs, sampled)
        if sweep not in plan.setdefault(point, []):
            plan[point].append(sweep)

    for k in grid.negatives:
        add(k, grid.fixed_subset, "negatives")
    for k in grid.infonce_negatives:
        add(k, grid.fixed_subset, "negatives", "infonce")
    for rows in grid.subsets:
        add(grid.fixed_negatives, rows, "bank size")
    if not plan:
        raise ConfigError("nothing to run: --negatives, --infonce-negatives and --subsets are all empty")
    return plan


def result_row(point: TrainPoint, sweeps: list[str], summary: dict | None, error: str | None = None) -> dict:
    """One row of results.parquet; accuracies are fractions, None for a failed point."""
    done = summary or {}
    top1, untrained = done.get("knn_top1"), done.get("knn_top1_untrained")
    row = dict(point=point.name, sweeps="+".join(sweeps), loss=point.loss, negatives=point.negatives, error=error)
    row |= dict(bank_rows=point.rows, epochs=point.epochs, knn_top1=top1, knn_top1_untrained=untrained)
    row["knn_top1_gain"] = None if top1 is None or untrained is None else top1 - untrained
    return row | {key: done.get(key) for key in ("knn_top5", "images_per_sec", "train_seconds", "final_loss", "steps")}


def write_plots(rows: list[dict], output: Path, dataset: str) -> list[Path]:
    """kNN top-1 against K and against the bank size, on log axes. The exact softmax has
    no K (every bank row is a negative): it and the untrained encoder are level lines."""
    done = [r for r in rows if r["knn_top1"] is not None]
    style = dict(y="top1", series="encoder", logx=True, ylabel="weighted kNN top-1 (%)")
    plots = []
    if swept := [r for r in done if "negatives" in r["sweeps"]]:
        n = swept[0]["bank_rows"]
        span = (min((r["negatives"] for r in swept if r["negatives"]), default=n), n)
        lines = [dict(K=r["negatives"], top1=100 * r["knn_top1"], encoder=r["loss"]) for r in swept if r["negatives"]]
        levels = [(r["knn_top1"], "the exact softmax") for r in swept if r["negatives"] is None]
        levels += [(swept[0]["knn_top1_untrained"], "untrained")]
        lines += [dict(K=k, top1=100 * value, encoder=label) for value, label in levels if value for k in span]
        title = f"{dataset}: kNN vs negatives (N = {n:,} images)"
        plots.append(plot_lines(output / "knn_vs_negatives.png", lines, x="K", title=title, **style))
    if swept := [r for r in done if "bank size" in r["sweeps"]]:
        pairs = (("knn_top1", "trained"), ("knn_top1_untrained", "untrained"))
        lines = [dict(rows=r["bank_rows"], top1=100 * r[k], encoder=label) for r in swept for k, label in pairs if r[k]]
        title = f"{dataset}: kNN vs bank size (rows = training images)"
        plots.append(plot_lines(output / "knn_vs_bank_size.png", lines, x="rows", title=title, **style))
    return plots


def run(args: argparse.Namespace) -> int:
    output = Path(args.output_dir)
    try:  # everything that can be wrong with the command, found before the first run
        grid = resolve_grid(args)
        config_path = resolve_config_path(args.config)
        base = load_config(config_path, [*grid.overrides, *args.overrides])
        d = base.data
        train_rows = len(load_dataset(d.name, d.root, train=True, download=d.download, image_size=d.image_size))
        plan = plan_points(grid, train_rows)
        overrides = [*grid.overrides, *args.overrides]
        configs = {p: load_config(config_path, [*overrides, *p.overrides(train_rows)]) for p in plan}
        summaries = {p: runs.finished(output / "points" / p.name, configs[p]) for p in plan}
    except (ConfigError, DatasetMissing, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    rows = []
    for point, sweeps in plan.items():
        summary, error, reused = summaries[point], None, summaries[point] is not None
        if not reused:
            try:
                summary = runs.train(configs[point], output / "points" / point.name, point.name)
            except TrainingStopped as stopped:  # a non-finite loss, say: the sweep goes on
                error = f"{stopped} (log: {output / 'points' / point.name / 'log.txt'})"
        rows.append(result_row(point, sweeps, summary, error))
        done = f"kNN top-1 {100 * summary['knn_top1']:.2f}%{' (reused)' if reused else ''}" if summary else ""
        print(f"{point.name}: {f'FAILED: {error}' if error else done}", flush=True)
    notes = [
        f"Config `{args.config}` on {base.data.name}, {grid.epochs} epoch(s) per run, overrides "
        f"`{' '.join(overrides) or '-'}`. Accuracies are fractions: weighted kNN "
        f"(k = {base.eval.k}, sigma = {base.eval.sigma}) against the bank rows, i.e. the run's own training "
        "images, so a smaller bank is also a smaller kNN index (`knn_top1_untrained`: the untrained encoder on "
        "the same index). Every run trains the same epochs, so smaller banks also get fewer steps.",
        f"{sum(s is not None for s in summaries.values())} of {len(rows)} point(s) were read back from earlier runs.",
    ]
    title = f"kNN accuracy vs negatives and bank size ({base.data.name})"
    write_table(rows, output, title, notes, plots=write_plots(rows, output, base.data.name))
    return 1 if any(r["error"] for r in rows) else 0
