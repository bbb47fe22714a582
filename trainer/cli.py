"""The `instdisc` command: one entry point, subcommands imported lazily so that
`instdisc bank serve` does not pay for torch."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from trainer.console import show_lines

log = logging.getLogger(__name__)


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser of `instdisc`; a benchmark's options are added only when `argv` names it."""
    parser = argparse.ArgumentParser(prog="instdisc", description="Instance Discrimination with a sharded memory bank.")
    commands = parser.add_subparsers(dest="command", required=True)

    bank = commands.add_parser("bank", help="the memory-bank service").add_subparsers(
        dest="bank_command", required=True
    )
    from bank_server.cli import add_reshard_arguments, add_serve_arguments

    add_serve_arguments(bank.add_parser("serve", help="serve one shard over gRPC"))
    add_reshard_arguments(bank.add_parser("reshard", help="rewrite a stored bank with another number of shards"))

    train = commands.add_parser("train", help="train InstDisc on Ray with the sharded bank")
    train.add_argument(
        "--config",
        default=None,
        help="a YAML file, or a shipped config: fashion-mnist (the demo), cifar10, imagenet; "
        "without it the defaults, made for any image set",
    )
    train.add_argument(
        "--output-dir",
        default=None,
        help="outputs, checkpoints and bank snapshots (default: a new folder runs/<start time>)",
    )
    train.add_argument(
        "--name", default="instdisc", help="run name; rerunning a name in the same --output-dir resumes it"
    )
    train.add_argument(
        "--storage-path",
        default=None,
        help="Ray Train checkpoint storage (default <output-dir>/ray); on a multi-node cluster a "
        "path every node mounts, or a URI such as s3://bucket/runs",
    )
    train.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.epochs=10 loss.kind=nce")

    export = commands.add_parser(
        "export",
        help="write the trained encoder (head dropped) for plain torch or torchvision",
        description="--format program: a torch.export program taking [0, 1] images of any height and width "
        "from the backbone's smallest side to 4x the training side (the normalisation is inside). "
        "--format torchvision: the backbone's weights in torchvision's key names with the normalisation "
        "beside them, for torchvision.models.resnet18/50 at any resolution.",
    )
    export.add_argument("checkpoint", help="a checkpoint folder (e.g. runs/demo/checkpoint)")
    export.add_argument("output", help="file to write, e.g. encoder.pt")
    export.add_argument(
        "--format",
        choices=("program", "torchvision"),
        default="program",
        help="program (default): a torch.export program; torchvision: a state dict for torchvision's "
        "resnet18/resnet50 (not model.arch=small)",
    )
    export.add_argument(
        "--head",
        action="store_true",
        help="keep the projection head: the program gives the run's unit embeddings (what its bank "
        "held and its kNN scored) instead of backbone features (--format program only)",
    )

    evaluate = commands.add_parser("eval", help="score an exported encoder, apart from training").add_subparsers(
        dest="eval_command", required=True
    )
    knn = evaluate.add_parser("knn", help="weighted kNN of an exported encoder on any dataset data.* loads")
    knn.add_argument("--encoder", required=True, help="a file written by `instdisc export` (either format)")
    knn.add_argument(
        "--config",
        default=None,
        help="a YAML file or shipped config for data.* and eval.k / eval.sigma (default: the defaults)",
    )
    knn.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. data.name=mnist eval.k=50")
    linear = evaluate.add_parser(
        "linear", help="linear probe: a linear classifier on an export's frozen, L2-normalised backbone features"
    )
    linear.add_argument(
        "--encoder", required=True, help="a file written by `instdisc export` (either format, without --head)"
    )
    linear.add_argument(
        "--config",
        default=None,
        help="a YAML file or shipped config for data.*, eval.linear_* and train.seed (default: the defaults)",
    )
    linear.add_argument(
        "--output-dir",
        default=None,
        help="where linear.json and the cached features go (default: the encoder's folder)",
    )
    linear.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. eval.linear_epochs=50 data.name=mnist")

    neighbors = commands.add_parser(
        "neighbors", help="a picture of the nearest training images of query images, by a run's encoder and bank"
    )
    neighbors.add_argument("--run", required=True, help="a run's folder (its config.yaml, checkpoint and bank)")
    queries = neighbors.add_mutually_exclusive_group(required=True)
    queries.add_argument("--images", nargs="+", metavar="FILE", help="query image files")
    queries.add_argument("--test", type=int, metavar="N", help="N evenly spaced images of the evaluation split")
    neighbors.add_argument("-k", type=int, default=8, help="neighbours per query (default 8)")
    neighbors.add_argument(
        "--output", default=None, help="the picture (default RUN/neighbors.png); its numbers go beside it, as .json"
    )
    neighbors.add_argument(
        "overrides", nargs="*", metavar="key=value", help="on the run's config, e.g. bank.addresses=host:50051,..."
    )

    for group, title in (
        ("bench", "benchmarks that print numbers"),
        ("scale", "scaling sweeps that write results.parquet, results.md and plots"),
    ):
        chosen = commands.add_parser(group, help=title).add_subparsers(dest=f"{group}_command", required=True)
        for (kind, name), (module, help_text) in BENCHMARKS.items():
            if kind == group:
                sub = chosen.add_parser(name, help=help_text)
                if list(argv[:2]) == [group, name]:  # only the command that runs imports its module
                    importlib.import_module(module).add_arguments(sub)
    return parser


def run_train(args) -> int:
    from bank_server.ray_bank import BankDidNotStart
    from trainer.config import load_config, resolve_config_path
    from trainer.launch import TrainingStopped, launch
    from trainer.outputs import table
    from trainer.run_dir import new_run_dir

    config = load_config(resolve_config_path(args.config), args.overrides)
    output_dir = args.output_dir or new_run_dir()
    output = Path(output_dir).resolve()
    try:  # as given: a submitted job refuses a relative one
        summary = launch(config, output_dir, run_name=args.name, storage_path=args.storage_path)
    except (TrainingStopped, BankDidNotStart) as error:
        if getattr(error, "summary", None):  # the epochs before the stop, written up
            print(table(error.summary, output), flush=True)
        log.error(error)
        return 1
    print(table(summary, output), flush=True)
    for warning in summary["warnings"]:
        log.warning(warning)
    return 0


def run_eval_linear(args) -> int:
    from trainer.config import load_config, resolve_config_path
    from trainer.linear import RESULT, evaluate_linear
    from trainer.outputs import percent

    config = load_config(resolve_config_path(args.config), args.overrides)
    result = evaluate_linear(args.encoder, config, args.output_dir)

    rows = [
        ("linear top-1", percent(result["linear_top1"])),
        ("linear top-5", percent(result["linear_top5"])),
        ("train top-1", percent(result["train_top1"])),
        (
            "recipe",
            f"{result['epochs']} epochs, SGD lr {result['lr']:g}, wd {result['weight_decay']:g}, "
            f"batch {result['batch_size']}, seed {result['seed']}",
        ),
        ("features", f"{result['features']} (backbone, L2-normalised)"),
        ("dataset", f"{result['dataset']}: {result['train_images']:,} train, {result['test_images']:,} test"),
        ("wrote", str(Path(result["feature_cache"]).parent.parent / RESULT)),
    ]
    width = max(len(key) for key, _ in rows)
    print("\n".join(f"{key:<{width}}  {value}" for key, value in rows), flush=True)
    return 0


def run_eval_knn(args) -> int:
    from trainer.config import load_config, resolve_config_path
    from trainer.evaluate import evaluate_knn
    from trainer.outputs import percent

    result = evaluate_knn(args.encoder, load_config(resolve_config_path(args.config), args.overrides))

    rows = [
        ("kNN top-1", percent(result["knn_top1"])),
        ("kNN top-5", percent(result["knn_top5"])),
        ("k, sigma", f"{result['k']}, {result['sigma']:g}"),
        ("features", result["features"]),
        ("dataset", f"{result['dataset']}: {result['train_images']:,} train, {result['test_images']:,} test"),
    ]
    width = max(len(key) for key, _ in rows)
    print("\n".join(f"{key:<{width}}  {value}" for key, value in rows), flush=True)
    return 0


# `instdisc bench ...` and `instdisc scale ...`: (command, subcommand) -> the module that
# holds its `add_arguments(parser)` and `run(args)`, and its help line.
BENCHMARKS = {
    ("bench", "bank"): ("benchmarks.bank", "Step latency vs a gRPC echo and an in-process bank; calls/s per shard"),
    ("bench", "train"): ("benchmarks.train", "training images/s: remote bank vs in-process bank"),
    ("bench", "reshard"): ("benchmarks.reshard", "time and peak memory of `bank reshard` on a large synthetic bank"),
    ("bench", "defaults"): (
        "benchmarks.defaults",
        "the default recipe on image sets nobody tuned it for, against raw pixels",
    ),
    ("scale", "bank"): ("benchmarks.scale_bank", "Step cost and memory vs rows, shards, negatives, dtype and clients"),
    ("scale", "train"): ("benchmarks.scale_train", "kNN accuracy vs negatives (and the exact softmax) and bank size"),
    ("scale", "data"): ("benchmarks.scale_data", "Parquet reading vs set size: train worker memory and images/s"),
    ("scale", "fan-in"): (
        "benchmarks.fan_in",
        "Steps a shard serves from W paced workers on M nodes, one Step per node or not",
    ),
}


def run_neighbors(args) -> int:
    from bank_server.token_source import BankTokenMissing, read_token
    from trainer.config import ConfigError
    from trainer.launch import token_source
    from trainer.neighbors import neighbours_of_run, run_config

    config = run_config(args.run, args.overrides)
    try:  # running shards' token, read where a run reads it; shards started from a snapshot take none
        token = read_token(*token_source(config)) if config.bank.addresses else None
    except BankTokenMissing as error:
        raise ConfigError(str(error)) from None
    print(neighbours_of_run(args.run, config, args.images, args.test, args.k, args.output, token), flush=True)
    return 0


def run_export(args) -> int:
    from trainer.export import export_encoder, export_torchvision

    if args.format == "torchvision":
        path, note = export_torchvision(args.checkpoint, args.output, head=args.head)
        print(path)
        if note:
            print(f"note: {note}")
    else:
        print(export_encoder(args.checkpoint, args.output, head=args.head))
    return 0


def user_errors() -> tuple[type[Exception], ...]:
    """What a user mends (a path, a file that is not what it should be, a config value):
    one line naming it, exit status 2, no traceback. Imported only when one is raised."""
    from bank_server.ray_bank import BankDoesNotFit
    from trainer.checkpoint import NotACheckpoint
    from trainer.config import ConfigError
    from trainer.export import NotAnExport
    from trainer.images import DatasetMissing
    from trainer.snapshot_bank import NoSnapshot, ShardDidNotStart

    # ValueError: the data layer's refusals (trainer.parquet.ParquetDataError among them).
    return (
        ConfigError,
        DatasetMissing,
        NotACheckpoint,
        NotAnExport,
        BankDoesNotFit,
        NoSnapshot,
        ShardDidNotStart,
        ValueError,
    )


# The commands that train or read what training wrote: their user errors are one line.
TRAINING_COMMANDS = {
    ("train", None): run_train,
    ("export", None): run_export,
    ("eval", "knn"): run_eval_knn,
    ("eval", "linear"): run_eval_linear,
    ("neighbors", None): run_neighbors,
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    show_lines()
    if args.command == "bank":
        from bank_server.cli import run_reshard, run_serve

        return (run_reshard if args.bank_command == "reshard" else run_serve)(args)
    command = TRAINING_COMMANDS.get((args.command, getattr(args, "eval_command", None)))
    if command is not None:
        try:
            return command(args)
        except user_errors() as error:
            log.error(error)
            return 2
    module, _ = BENCHMARKS[(args.command, getattr(args, f"{args.command}_command"))]
    return importlib.import_module(module).run(args)


if __name__ == "__main__":
    sys.exit(main())
