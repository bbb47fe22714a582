"""`instdisc bench defaults`: what the default recipe reaches on image sets nobody
tuned it for, given only ``data.*``.

For each set it measures three weighted kNN figures on the same test split, with the
same k and sigma: raw pixels (the image as a unit vector), the untrained encoder, and
the encoder after ``instdisc train`` with the default config and nothing but the
dataset's keys. The defaults hold on a set when training ends above the untrained
encoder and within ``--tolerance`` points of raw pixels.

The sets are the Parquet sets of `benchmarks.image_sets` (written into
``DIR/data/``) and a 2,000-image Fashion-MNIST subset. Each run goes into
``DIR/points/<set>/`` (`benchmarks.runs`); a set that finished there before is read back.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from benchmarks import runs
from benchmarks.image_sets import SETS, write_set
from benchmarks.report import write_table
from trainer.config import ConfigError, load_config, resolve_config_path
from trainer.data import load_datasets
from trainer.evaluate import embed_all
from trainer.knn import knn_accuracy

FASHION_2K = "fashion-mnist-2k"
ALL_SETS = (*SETS, FASHION_2K)
# The only keys a run of that set is given (a Parquet set: data.name=parquet and its folder).
FASHION_2K_KEYS = ["data.name=fashion-mnist", "data.subset=2000", "data.test_subset=2000"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[0].replace("`", "")
    parser.add_argument("--output-dir", default="runs/defaults", help="data/, points/<set>/ and the results")
    parser.add_argument("--sets", default=",".join(ALL_SETS), help="comma-separated (default: all of them)")
    parser.add_argument("--config", help="a config to start every run from (default: the defaults)")
    parser.add_argument("--tolerance", type=float, default=3.0, help="points below raw pixels still holding")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="for every run (the check gives none)")


def pixel_knn(config) -> dict:
    """Weighted kNN on raw pixels, over the splits the run itself uses."""
    train_set, test_set = load_datasets(config)
    pixels = torch.nn.Flatten()
    e = config.eval
    classes = train_set.num_classes
    top1, _ = knn_accuracy(*embed_all(pixels, train_set), *embed_all(pixels, test_set), classes, e.k, e.sigma)
    return dict(train_images=len(train_set), test_images=len(test_set), classes=classes, knn_top1_pixels=top1)


def result_row(name: str, pixels: dict, summary: dict, tolerance: float) -> dict:
    trained, untrained, raw = summary["knn_top1"], summary["knn_top1_untrained"], pixels["knn_top1_pixels"]
    holds = trained > untrained and trained >= raw - tolerance / 100
    row = dict(set=name, **pixels, knn_top1_untrained=untrained, knn_top1=trained, holds=holds)
    row |= dict(vs_pixels_points=100 * (trained - raw), vs_untrained_points=100 * (trained - untrained))
    return row | {key: summary[key] for key in ("steps", "epochs", "train_seconds")}


def run(args: argparse.Namespace) -> int:
    names = [n.strip() for n in args.sets.split(",") if n.strip()]
    unknown = [n for n in names if n not in ALL_SETS]
    if unknown:
        print(f"unknown set(s) {', '.join(unknown)}; choose from {', '.join(ALL_SETS)}", file=sys.stderr)
        return 2
    output, config_path = Path(args.output_dir), resolve_config_path(args.config)
    rows = []
    try:
        for name in names:
            if name in SETS and not (output / "data" / name / "test.parquet").exists():
                write_set(name, output / "data" / name)
            parquet = ["data.name=parquet", f"data.root={output / 'data' / name}"]
            config = load_config(config_path, [*(FASHION_2K_KEYS if name == FASHION_2K else parquet), *args.overrides])
            pixels = pixel_knn(config)
            folder = output / "points" / name
            summary = runs.finished(folder, config) or runs.train(config, folder, f"defaults-{name}")
            rows.append(r := result_row(name, pixels, summary, args.tolerance))
            top1 = dict(kNN=r["knn_top1"], untrained=r["knn_top1_untrained"], pixels=r["knn_top1_pixels"])
            figures = " | ".join(f"{what} {100 * value:.2f} %" for what, value in top1.items())
            verdict = "holds" if r["holds"] else "DOES NOT HOLD"
            print(f"{name}: {figures} | {summary['steps']} steps | {verdict}", flush=True)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    notes = [
        f"Config `{args.config or 'defaults'}` with only the data keys and `{' '.join(args.overrides) or '-'}`; "
        f"holds = above the untrained encoder and within {args.tolerance:g} points of raw-pixel kNN (same k and "
        "sigma)."
    ]
    write_table(rows, output, "The defaults on unseen image sets", notes)
    return 0 if all(row["holds"] for row in rows) else 1
