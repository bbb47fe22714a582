"""Build and run the TorchTrainer; start (or connect to) the bank; write the outputs.

Works the same under `make demo` (a local Ray), `ray job submit` (RAY_ADDRESS set,
so `ray.init()` joins the cluster) and a KubeRay RayJob (bank.addresses given).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path


from trainer.config import Config, ConfigError
from trainer.schedule import length_given_by, run_length

log = logging.getLogger("instdisc")

# Model checkpoints kept; the bank keeps one snapshot more (the shutdown one).
KEEP_CHECKPOINTS = 2
_SUBMITTED_JOB = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for an entrypoint
_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def _quiet_ray_workers() -> None:
    """Runs in every Ray worker process: without the dashboard, Ray Train's
    placement-group cleaner warns every second or two that it cannot query state."""
    logging.getLogger(_CLEANER_LOGGER).setLevel(logging.ERROR)
    try:  # this one logs every reported metric at INFO, under a logger named by its file path
        from ray.train.v2._internal.execution import context

        logging.getLogger(context.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def check_against_dataset(config: Config, train_rows: int, image_side: int) -> None:
    """Config errors that need the dataset's size, caught before anything starts; K
    larger than the bank is capped at its rows (said on the console), so that the
    default K = 4096 also trains a dataset of a thousand images."""
    from trainer.models import min_image_size

    if config.loss.kind in ("nce", "infonce") and config.loss.negatives > train_rows:
        print(f"loss.negatives={config.loss.negatives} exceeds the {train_rows} training images (the bank's rows): "
              f"K = {train_rows}", flush=True)
        config.loss.negatives = train_rows
    need = min_image_size(config.model.arch, config.model.cifar_stem)
    if image_side < need:
        raise ConfigError(f"model.arch={config.model.arch} needs images of at least {need}x{need} pixels, the "
                          f"dataset gives {image_side}x{image_side}")
    if config.bank.shards > train_rows:
        raise ConfigError(f"bank.shards={config.bank.shards} exceeds the {train_rows} training images")
    if config.train.batch_size > train_rows:
        raise ConfigError(f"train.batch_size={config.train.batch_size} exceeds the {train_rows} training images")


TOKEN_ENV = "INSTDISC_BANK_TOKEN"


def token_source(config: Config) -> tuple[str | None, str | None]:
    """Where the bank token is read, as ``(token_file, token_env)``: `bank.token_file`,
    else the variable INSTDISC_BANK_TOKEN when this process has it, else no token. Only
    this travels (to the shard actors and the train workers), never the token: Ray keeps
    actor arguments and Ray Train's loop config in its records. Each process reads the
    token on its node (`read_token`): the file must be on every node (a mounted Secret),
    the variable in every Ray node's environment (a local Ray inherits this process's)."""
    if config.bank.token_file:
        return config.bank.token_file, None
    return None, (TOKEN_ENV if os.environ.get(TOKEN_ENV, "").strip() else None)


def _check_bank(addresses: list[str], token: str | None, config: Config, rows: int) -> list[str]:
    """Fail fast, before any worker starts, on an unreachable or mismatched bank; returns
    every shard's address in shard order (a ``{shard}`` template expanded)."""
    from bank_server.client import BankClient, BankRpcError, LayoutError

    print(f"bank: connecting to {','.join(addresses)} (retries for up to bank.timeout={config.bank.timeout:g} s "
          "while it starts)", flush=True)
    try:
        with BankClient(addresses, token=token, timeout=config.bank.timeout, tls_ca=config.bank.tls_ca) as client:
            if (client.rows, client.dim) != (rows, config.model.dim):
                raise ConfigError(f"the bank at {','.join(addresses)} holds {client.rows} rows x {client.dim} dims; "
                                  f"this run needs {rows} x {config.model.dim} (training images x model.dim)")
            return client.addresses
    except BankRpcError as error:
        hint = {"UNAVAILABLE": "is the bank running and reachable from here?",
                "UNAUTHENTICATED": "check bank.token_file / INSTDISC_BANK_TOKEN",
                "DEADLINE_EXCEEDED": "is the bank running and reachable from here?"}.get(error.code.name, "")
        raise ConfigError(f"cannot use bank shard {error.address}: {error.code.name}: {error.details} {hint}") from error
    except LayoutError as error:
        raise ConfigError(f"bank.addresses do not form one bank: {error}") from error


def init_ray(sha: str = "") -> None:
    """Join the cluster that RAY_ADDRESS names (``ray job submit`` sets it), or else
    start a private local Ray. Never a cluster nobody asked for: ``ray.init()`` alone
    would join whatever ``/tmp/ray/ray_current_cluster`` names, even a dead one."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if not address:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local cluster on loopback
    ray.init(address=address or "local", include_dashboard=False, log_to_driver=True,
             num_cpus=None if address else os.cpu_count(),
             runtime_env={"worker_process_setup_hook": _quiet_ray_workers, "env_vars": {"INSTDISC_GIT_SHA": sha}})
    _quiet_ray_workers()


def launch(config: Config, output_dir: str | Path, run_name: str = "instdisc", storage_path: str | None = None) -> dict:
    """Train, evaluate and write the outputs; returns the summary.

    ``storage_path`` is Ray Train's storage for checkpoints (default ``<output_dir>/ray``);
    on a multi-node cluster it must be reachable from every node: a shared mount or a
    URI such as ``s3://bucket/runs``.
    """
    import ray

    from bank_server.protocol import message_limit
    from bank_server.ray_bank import BankTokenMissing, read_token, start_bank
    from trainer.input import describe

    if os.environ.get(_SUBMITTED_JOB) and not Path(output_dir).is_absolute():
        raise ConfigError(f"--output-dir {output_dir} is relative, and a submitted job runs in a temporary copy of "
                          "its working dir that Ray deletes; give an absolute path (a shared one on multi-node clusters)")
    output = Path(output_dir).resolve()
    output.mkdir(parents=True, exist_ok=True)
    sha = git_sha()
    print(f"instdisc {sha or '(no git)'} -> {output}")
    print("resolved config:\n" + json.dumps(config.to_dict(), indent=2), flush=True)

    token_file, token_env = token_source(config)
    try:  # here first: a missing token stops the run before anything is loaded
        token = read_token(token_file, token_env)
    except BankTokenMissing as error:
        raise ConfigError(str(error)) from None
    if config.data.root and "://" not in config.data.root:
        # Train workers run in a folder of Ray's: a relative path would not be found there.
        config.data.root = str(Path(config.data.root).expanduser().absolute())
    data = describe(config)  # a streamed dataset: from its files' metadata and one image
    print(f"data: {data.describe()}", flush=True)
    check_against_dataset(config, data.train_rows, data.side)
    length = run_length(data.train_rows, config.train.batch_size, config.train.epochs, config.train.steps)
    given = length_given_by(config.train.epochs, config.train.steps)
    print(f"run length ({given}): {length.describe()} of {config.train.batch_size} images", flush=True)
    try:  # the outputs need it; found missing now, not after the training it would have written up
        import torch.utils.tensorboard  # noqa: F401
    except ImportError as error:
        raise ConfigError(f"TensorBoard is not installed ({error}); pip install tensorboard") from None
    addresses = _check_bank(list(config.bank.addresses), token, config, data.train_rows) if config.bank.addresses else []

    init_ray(sha)

    bank = None
    if addresses:
        print(f"bank: {len(addresses)} shard(s) at {', '.join(addresses)}", flush=True)
    else:
        # Per run name: another run in the same output folder must not restore these rows.
        bank = start_bank(config.bank.shards, data.train_rows, config.model.dim, config.bank.dtype,
                          snapshot_dir=os.path.join(os.path.expanduser(config.bank.snapshot_dir or str(output / "bank")),
                                                    run_name),
                          seed=config.bank.seed,
                          token_file=token_file, token_env=token_env,
                          name=f"{run_name}-bank", keep_snapshots=KEEP_CHECKPOINTS + 1,
                          placement=config.bank.placement,
                          # Large enough for this run's Steps: one message per shard.
                          max_message_bytes=message_limit(config.train.batch_size, config.loss.negatives,
                                                          config.model.dim, config.bank.dtype),
                          # A private local Ray keeps the bank on loopback; on a cluster each
                          # shard binds its node's address, which the other nodes can reach.
                          host=None if os.environ.get("RAY_ADDRESS") else "127.0.0.1")
        addresses = bank.addresses
        print(f"bank: {config.bank.shards} shard actor(s), placement {config.bank.placement}:\n  "
              + "\n  ".join(bank.describe()), flush=True)

    try:
        result, wall, restarts = _fit(config, storage_path or str(output / "ray"), run_name, addresses, token_env,
                                      bank.names if bank else [])
    finally:
        if bank is not None:
            bank.stop(final_snapshot=True)
    outcome = result.return_value | {"worker_restarts": restarts}
    if outcome.get("error"):
        where = result.checkpoint.path if result.checkpoint else "none was written"
        if any(h["epoch"] > 0 for h in outcome["history"]) and result.checkpoint is not None:
            write_outputs(config, output, outcome, result.checkpoint, wall, sha)
        raise TrainingStopped(f"{outcome['error']}. Last good checkpoint: {where}")
    return write_outputs(config, output, outcome, result.checkpoint, wall, sha)


class TrainingStopped(RuntimeError):
    """Training ended early on purpose (a non-finite loss); the message says why."""


def _fit(config: Config, storage_path: str, run_name: str, addresses: list[str], token_env: str | None,
         bank_actors: list[str]):
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from trainer.train import LoopStarts, train_func

    c = config.train
    use_gpu = c.use_gpu
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= c.workers
        print(f"train.use_gpu not set: {'using' if use_gpu else 'no'} GPUs", flush=True)
    # Counts the train loop's starts in this launch: Ray Train restarts every worker when
    # one fails (train.max_failures). Per launch, so the name is too.
    starts_name = f"{run_name}-loop-starts-{uuid.uuid4().hex[:8]}"
    starts = ray.remote(LoopStarts).options(name=starts_name, num_cpus=0).remote()
    trainer = TorchTrainer(
        train_func,
        # Ray Train stores this: where the token is (bank.token_file is in the config), never the token.
        train_loop_config={"config": config.to_dict(), "addresses": addresses, "token_env": token_env,
                           "bank_actors": bank_actors, "starts": starts_name},
        scaling_config=ScalingConfig(num_workers=c.workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": c.cpus_per_worker, "GPU": 1} if use_gpu
                                     else {"CPU": c.cpus_per_worker}),
        run_config=RunConfig(name=run_name, storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=c.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
                             # Ray Train's INFO lines repeat every reported metric; our own
                             # progress lines say what matters.
                             logging_config=LoggingConfig(log_level="WARNING")))
    start = time.perf_counter()
    try:
        result = trainer.fit()
    except Exception as error:  # Ray wraps worker errors (after FailureConfig's retries)
        raise TrainingStopped(f"training failed: {error}") from error
    finally:
        restarts = ray.get(starts.restarts.remote(), timeout=60)
        ray.kill(starts)
    return result, time.perf_counter() - start, restarts


def below_untrained(epoch: dict, untrained: float | None) -> str | None:
    """The warning for an evaluated epoch whose kNN top-1 is below the untrained
    encoder's, or None. The one wording: the run logs it, summary.json keeps it."""
    top1 = epoch["knn_top1"]
    if untrained is None or epoch["epoch"] == 0 or math.isnan(top1) or top1 >= untrained:
        return None
    return (f"kNN top-1 {percent(top1)} at epoch {epoch['epoch']} is below the untrained encoder's "
            f"{percent(untrained)}: training made the features worse for kNN")


def run_warnings(trained: list[dict], untrained: float | None) -> list[str]:
    """What summary.json warns of: a run that ends below the untrained encoder's kNN, and
    in one line the evaluated epochs that dipped below it on the way. Small datasets
    often dip for their first few hundred steps and then rise well above (BENCHMARKS.md,
    the defaults), so each dip is logged as it happens but not kept one by one."""
    scored = [h for h in trained if not math.isnan(h["knn_top1"])]
    dips = [h for h in scored if below_untrained(h, untrained)]
    if not dips:
        return []
    warnings = []
    if scored[-1] is dips[-1]:
        warnings.append(below_untrained(scored[-1], untrained))
    if len(dips) > 1 or scored[-1] is not dips[-1]:
        lowest = min(dips, key=lambda h: h["knn_top1"])
        warnings.append(f"kNN top-1 was below the untrained encoder's {percent(untrained)} at {len(dips)} of "
                        f"{len(scored)} evaluated epochs ({dips[0]['epoch']} to {dips[-1]['epoch']}; lowest "
                        f"{percent(lowest['knn_top1'])} at epoch {lowest['epoch']})")
    return warnings


def write_outputs(config: Config, output: Path, outcome: dict, checkpoint, wall_seconds: float, sha: str) -> dict:
    from trainer.export import export_encoder

    history = outcome["history"]
    trained = [h for h in history if h["epoch"] > 0]
    final = trained[-1]
    # The last evaluated epoch: a run that stopped early may end on one that was not.
    scored = next((h for h in reversed(trained) if not math.isnan(h["knn_top1"])), None)
    initial = next((h for h in history if h["epoch"] == 0), None)
    checkpoint_dir = output / "checkpoint"
    if checkpoint is not None:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
        checkpoint.to_directory(str(checkpoint_dir))  # also when the storage is remote (s3://...)
        export_encoder(checkpoint_dir, output / "encoder.pt")
    summary = {
        "knn_top1": scored["knn_top1"] if scored else None, "knn_top5": scored["knn_top5"] if scored else None,
        "knn_epoch": scored["epoch"] if scored else None,
        "knn_top1_untrained": initial["knn_top1"] if initial else None,
        "knn_source": config.eval.source,
        "epochs": final["epoch"], "steps": outcome["steps"],
        "images_per_sec": sum(h["images_per_sec"] for h in trained) / len(trained),
        "train_seconds": outcome["train_seconds"], "wall_seconds": wall_seconds,
        "final_loss": final["loss"], "bank_rtt_ms": final["bank_rtt_ms"], "bank_wait_ms": final["bank_wait_ms"],
        "eval_seconds": _mean(h.get("eval_seconds", math.nan) for h in trained),
        "refresh_seconds": _mean(h.get("refresh_seconds", math.nan) for h in trained),
        "dataset": config.data.name, "loss": config.loss.kind, "git_sha": sha,
        "warnings": run_warnings(trained, initial["knn_top1"] if initial else None),
        # Each worker's record of each shard outage it saw (so a shard that every worker
        # saw go counts once per worker), since the run began; and Ray Train's restarts of
        # the workers in this launch, with the checkpoint epoch each went on from.
        "bank_outages": len(outcome["bank_outages"]), "bank_outage_details": outcome["bank_outages"],
        "worker_restarts": len(outcome["worker_restarts"]), "worker_restart_epochs": outcome["worker_restarts"],
    }
    fields = ["epoch", "step", "loss", "knn_top1", "knn_top5", "lr", "images_per_sec", "epoch_seconds", "bank_rtt_ms",
              "bank_wait_ms", "eval_seconds", "refresh_seconds"]
    with open(output / "metrics.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
    (output / "summary.json").write_text(json.dumps(summary, indent=2))  # again below, with the probe's figures
    write_tensorboard(output / "tensorboard", history, outcome.get("step_log", []))
    plot_curves(history, output / "curves.png")
    if config.eval.linear and checkpoint is not None:
        from trainer.linear import evaluate_linear

        # The probe of the run's final encoder (encoder.pt, the backbone), on the run's data.
        linear = evaluate_linear(str(output / "encoder.pt"), config, output)
        summary.update(linear_top1=linear["linear_top1"], linear_top5=linear["linear_top5"])
    elif config.eval.linear:
        print("eval.linear: no linear probe, the run left no checkpoint to export an encoder from", flush=True)
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    print_summary(summary, output)
    for warning in summary["warnings"]:
        print(f"WARNING: {warning}", flush=True)
    return summary


def _mean(values) -> float | None:
    """Mean of the finite values; None when there is none (never NaN in summary.json)."""
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return sum(finite) / len(finite) if finite else None


# The run's scalars under these tags; the x axis is the optimizer step.
TENSORBOARD_STEP_TAGS = {"loss": "train/loss", "lr": "train/lr", "images_per_sec": "train/images_per_sec",
                         "bank_rtt_ms": "train/bank_rtt_ms"}
TENSORBOARD_EPOCH_TAGS = {"knn_top1": "knn/top1", "knn_top5": "knn/top5", "loss": "epoch/loss",
                          "images_per_sec": "epoch/images_per_sec", "bank_rtt_ms": "epoch/bank_rtt_ms",
                          "eval_seconds": "epoch/eval_seconds", "refresh_seconds": "epoch/refresh_seconds"}


def write_tensorboard(folder: Path, history: list[dict], step_log: list[dict]) -> None:
    """TensorBoard event files beside metrics.csv, from what the run returned: the
    progress lines' numbers (`step_log`) and each epoch's. Written here, by the driver,
    for the reason metrics.csv is: rank 0 may run on another node, and these numbers
    reach the driver in the run's result and its checkpoints (a resumed run keeps its
    earlier steps). Rewritten whole each time, so a resume leaves one consistent log."""
    from torch.utils.tensorboard import SummaryWriter

    shutil.rmtree(folder, ignore_errors=True)
    with SummaryWriter(str(folder)) as writer:
        for entry in step_log:
            for key, tag in TENSORBOARD_STEP_TAGS.items():
                writer.add_scalar(tag, entry[key], entry["step"])
        for entry in history:
            step = entry.get("step", 0)
            for key, tag in TENSORBOARD_EPOCH_TAGS.items():
                value = entry.get(key)
                if value is not None and not math.isnan(value):
                    writer.add_scalar(tag, value, step)


def plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_knn) = plt.subplots(1, 2, figsize=(10, 4))
    trained = [h for h in history if not math.isnan(h["loss"])]
    ax_loss.plot([h["epoch"] for h in trained], [h["loss"] for h in trained], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="loss")
    evaluated = [h for h in history if not math.isnan(h["knn_top1"])]
    ax_knn.plot([h["epoch"] for h in evaluated], [100 * h["knn_top1"] for h in evaluated], marker="o", label="top-1")
    ax_knn.plot([h["epoch"] for h in evaluated], [100 * h["knn_top5"] for h in evaluated], marker="s", label="top-5")
    ax_knn.set(xlabel="epoch (0 = untrained encoder)", ylabel="weighted kNN accuracy (%)", title="kNN accuracy")
    ax_knn.legend()
    for ax in (ax_loss, ax_knn):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_summary(summary: dict, output: Path) -> None:
    rows = [
        ("kNN top-1", percent(summary["knn_top1"])),
        ("kNN top-5", percent(summary["knn_top5"])),
        ("kNN top-1, untrained", percent(summary["knn_top1_untrained"])),
        *([("linear top-1", percent(summary["linear_top1"])), ("linear top-5", percent(summary["linear_top5"]))]
          if "linear_top1" in summary else []),
        ("epochs, steps", f"{summary['epochs']}, {summary['steps']:,}"),
        ("images/s", f"{summary['images_per_sec']:,.0f}"),
        ("train time", f"{summary['train_seconds']:.0f} s"),
        ("bank round trip", f"{summary['bank_rtt_ms']:.1f} ms (waited {summary['bank_wait_ms']:.1f} ms)"),
        ("kNN evaluation", _seconds(summary["eval_seconds"]) + f" each (eval.source={summary['knn_source']})"),
        *([("bank refresh", _seconds(summary["refresh_seconds"]) + " each")]
          if summary["refresh_seconds"] is not None else []),
        ("bank outages", _outages(summary["bank_outage_details"])),
        ("worker restarts", str(summary["worker_restarts"])),
        ("outputs", str(output)),
    ]
    width = max(len(k) for k, _ in rows)
    line = "+" + "-" * (width + 2) + "+" + "-" * (max(len(v) for _, v in rows) + 2) + "+"
    print(line)
    for key, value in rows:
        print(f"| {key:<{width}} | {value:<{len(line) - width - 7}} |")
    print(line, flush=True)


def _outages(outages: list[dict]) -> str:
    """'none', or how many (seen by a worker each), which shards, the longest."""
    if not outages:
        return "none"
    shards = ", ".join(str(s) for s in sorted({o["shard"] for o in outages}))
    return (f"{len(outages)} (shard {shards}; longest {max(o['seconds'] for o in outages):.1f} s; "
            "each worker's count)")


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def percent(fraction: float | None) -> str:
    """A kNN figure for people: '-' where there is none (an epoch not evaluated)."""
    return "-" if fraction is None or math.isnan(fraction) else f"{100 * fraction:.2f} %"
