"""Build and run the TorchTrainer; start (or connect to) the bank; write the outputs.

Works the same under `make demo` (a local Ray), `ray job submit` (RAY_ADDRESS set,
so `ray.init()` joins the cluster) and a KubeRay RayJob (bank.addresses given).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import yaml

from trainer.config import Config, ConfigError
from trainer.console import quiet_ray_workers
from trainer.live_tensorboard import TENSORBOARD_DIR, require_tensorboard, start_event_writer
from trainer.outputs import write_outputs
from trainer.resume import CannotResume
from trainer.run_dir import CONFIG_FILE, bank_for_resume, check_resumable, latest_checkpoint
from trainer.schedule import length_given_by, run_length

log = logging.getLogger(__name__)

# Model checkpoints kept; the bank keeps one snapshot more (the shutdown one).
KEEP_CHECKPOINTS = 2
_SUBMITTED_JOB = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for an entrypoint


def git_sha() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def check_against_dataset(config: Config, train_rows: int, image_side: int) -> None:
    """Config errors that need the dataset's size, caught before anything starts; K
    larger than the bank is capped at its rows (said on the console), so that the
    default K = 4096 also trains a dataset of a thousand images."""
    from trainer.models import min_image_size

    if config.loss.kind in ("nce", "infonce") and config.loss.negatives > train_rows:
        log.info(
            f"loss.negatives={config.loss.negatives} exceeds the {train_rows} training images (the bank's "
            f"rows): K = {train_rows}"
        )
        config.loss.negatives = train_rows
    need = min_image_size(config.model.arch, config.model.cifar_stem)
    if image_side < need:
        raise ConfigError(
            f"model.arch={config.model.arch} needs images of at least {need}x{need} pixels, the "
            f"dataset gives {image_side}x{image_side}"
        )
    per_epoch = max(1, train_rows // config.train.batch_size)
    if config.train.refresh_bank_every and config.train.refresh_bank_every < per_epoch:
        log.warning(
            f"train.refresh_bank_every={config.train.refresh_bank_every} encodes all {train_rows:,} training "
            f"images every {config.train.refresh_bank_every} steps, more often than an epoch ({per_epoch:,} "
            "steps): it counts optimizer steps, not epochs"
        )
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

    log.info(
        f"bank: connecting to {','.join(addresses)} (retries for up to bank.timeout={config.bank.timeout:g} s "
        "while it starts)"
    )
    try:
        with BankClient(addresses, token=token, timeout=config.bank.timeout, tls_ca=config.bank.tls_ca) as client:
            if (client.rows, client.dim) != (rows, config.model.dim):
                raise ConfigError(
                    f"the bank at {','.join(addresses)} holds {client.rows} rows x {client.dim} dims; "
                    f"this run needs {rows} x {config.model.dim} (training images x model.dim)"
                )
            return client.addresses
    except BankRpcError as error:
        hint = {
            "UNAVAILABLE": "is the bank running and reachable from here?",
            "UNAUTHENTICATED": "check bank.token_file / INSTDISC_BANK_TOKEN",
            "DEADLINE_EXCEEDED": "is the bank running and reachable from here?",
        }.get(error.code.name, "")
        raise ConfigError(
            f"cannot use bank shard {error.address}: {error.code.name}: {error.details} {hint}"
        ) from error
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
    ray.init(
        address=address or "local",
        include_dashboard=False,
        log_to_driver=True,
        num_cpus=None if address else os.cpu_count(),
        runtime_env={"worker_process_setup_hook": quiet_ray_workers, "env_vars": {"INSTDISC_GIT_SHA": sha}},
    )
    quiet_ray_workers()


def launch(config: Config, output_dir: str | Path, run_name: str = "instdisc", storage_path: str | None = None) -> dict:
    """Train, evaluate and write the outputs; returns the summary.

    ``storage_path`` is Ray Train's storage for checkpoints (default ``<output_dir>/ray``);
    on a multi-node cluster it must be reachable from every node: a shared mount or a
    URI such as ``s3://bucket/runs``.
    """

    from bank_server.protocol import message_limit
    from bank_server.ray_bank import BankTokenMissing, read_token, resolver, start_bank
    from trainer.input import describe

    if os.environ.get(_SUBMITTED_JOB) and not Path(output_dir).is_absolute():
        raise ConfigError(
            f"the output folder {output_dir} is relative, and a submitted job runs in a temporary copy of "
            "its working dir that Ray deletes; give --output-dir an absolute path (a shared one on multi-node "
            "clusters)"
        )
    output = Path(output_dir).resolve()
    output.mkdir(parents=True, exist_ok=True)
    sha = git_sha()
    log.info(f"instdisc {sha or '(no git)'} -> {output}")
    log.info(f"config: {' '.join(config.differences()) or 'the defaults'} (all of it: {output / CONFIG_FILE})")

    token_file, token_env = token_source(config)
    try:  # here first: a missing token stops the run before anything is loaded
        token = read_token(token_file, token_env)
    except BankTokenMissing as error:
        raise ConfigError(str(error)) from None
    if config.data.root and "://" not in config.data.root:
        # Train workers run in a folder of Ray's: a relative path would not be found there.
        config.data.root = str(Path(config.data.root).expanduser().absolute())
    data = describe(config)  # a streamed dataset: from its files' metadata and one image
    log.info(f"data: {data.describe()}")
    check_against_dataset(config, data.train_rows, data.side)
    length = run_length(data.train_rows, config.train.batch_size, config.train.epochs, config.train.steps)
    given = length_given_by(config.train.epochs, config.train.steps)
    log.info(f"run length ({given}): {length.describe()} of {config.train.batch_size} images")
    require_tensorboard()
    storage_path = storage_path or str(output / "ray")
    # Per run name: another run in the same output folder must not restore these rows.
    snapshots = os.path.join(os.path.expanduser(config.bank.snapshot_dir or str(output / "bank")), run_name)
    found = latest_checkpoint(storage_path, run_name)
    if found is not None:
        try:
            state = check_resumable(found, data.fingerprint)
            if not config.bank.addresses and not snapshots.startswith("$") and "://" not in snapshots:
                layout = (data.train_rows, config.model.dim, config.bank.dtype)
                bank_for_resume(found, snapshots, state["bank_snapshot"], config.bank.shards, layout)
        except CannotResume as error:
            raise ConfigError(str(error)) from None
        log.info(f"resuming run {run_name!r} from its checkpoint at step {state['step']} ({found})")
    else:  # a run that starts anew replaces whatever events an earlier run left here
        shutil.rmtree(output / TENSORBOARD_DIR, ignore_errors=True)
    (output / CONFIG_FILE).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    addresses = (
        _check_bank(list(config.bank.addresses), token, config, data.train_rows) if config.bank.addresses else []
    )
    if addresses and found is not None and len(state["bank_addresses"]) != len(addresses):
        trained = len(state["bank_addresses"])
        raise ConfigError(
            f"cannot resume {found}: its bank had {trained} shards, bank.addresses names {len(addresses)}. "
            f"Reshard the shards' snapshot folder offline (instdisc bank reshard SNAPSHOT_DIR NEW_DIR "
            f"--shards {len(addresses)} --tag {state['bank_snapshot']}), serve NEW_DIR with --num-shards "
            f"{len(addresses)}, and resume"
        )

    init_ray(sha)

    bank = None
    if addresses:
        log.info(f"bank: {len(addresses)} shard(s) at {', '.join(addresses)}")
    else:
        bank = start_bank(
            config.bank.shards,
            data.train_rows,
            config.model.dim,
            config.bank.dtype,
            snapshot_dir=snapshots,
            seed=config.bank.seed,
            token_file=token_file,
            token_env=token_env,
            name=f"{run_name}-bank",
            keep_snapshots=KEEP_CHECKPOINTS + 1,
            # Large enough for this run's Steps, one message per shard: a node's Step
            # carries its workers' rows (at most the global batch) and all their
            # negatives (a node that would need more than gRPC's limit splits its Step).
            max_message_bytes=min(
                message_limit(
                    config.train.batch_size,
                    config.loss.negatives * (config.train.workers if config.bank.one_step_per_node else 1),
                    config.model.dim,
                    config.bank.dtype,
                ),
                2**31 - 1,
            ),
            # A private local Ray keeps the bank on loopback; on a cluster each
            # shard binds its node's address, which the other nodes can reach.
            host=None if os.environ.get("RAY_ADDRESS") else "127.0.0.1",
        )
        addresses = bank.addresses
        log.info(f"bank: {config.bank.shards} shard actor(s):\n  " + "\n  ".join(bank.describe()))

    try:
        result, wall, restarts = _fit(
            config, output, storage_path, run_name, addresses, token_env, bank.names if bank else []
        )
        if result.checkpoint is not None and not result.return_value.get("error"):
            # Where the shards serve now: one that restarted during the run serves on another port.
            serving = addresses
            if bank is not None:
                serving = [resolver(bank.names)(s, config.bank.timeout) for s in range(len(bank.names))]
            _picture_neighbours(config, output, result.checkpoint, serving, token, data.test_split)
    finally:
        if bank is not None:
            bank.stop(final_snapshot=True)
    outcome = result.return_value | {"worker_restarts": restarts}
    if outcome.get("error"):
        where = result.checkpoint.path if result.checkpoint else "none was written"
        summary = None
        if any(h["step"] > 0 for h in outcome["history"]) and result.checkpoint is not None:
            summary = write_outputs(config, output, outcome, result.checkpoint, wall, sha)
        raise TrainingStopped(f"{outcome['error']}. Last good checkpoint: {where}", summary)
    return write_outputs(config, output, outcome, result.checkpoint, wall, sha)


def _picture_neighbours(config: Config, output: Path, checkpoint, addresses: list[str], token, test_split) -> None:
    """neighbors.png: test images and their nearest bank rows, while the run's bank still
    serves. A picture that cannot be made is a warning: it must not cost the run's outputs."""
    from trainer.neighbors import PICTURE, RUN_QUERIES, picture_of_run

    if test_split is None:
        log.info(f"no {PICTURE}: the data has no evaluation split to take query images from")
        return
    try:
        with checkpoint.as_directory() as folder:
            path = picture_of_run(config, folder, addresses, token, output / PICTURE)
    except Exception as error:  # noqa: BLE001 -- whatever it was, the run's outputs come first
        log.warning(f"no {PICTURE}: {type(error).__name__}: {error}")
        return
    log.info(f"{PICTURE}: the nearest training images of {RUN_QUERIES} test images, in {path}")


class TrainingStopped(RuntimeError):
    """Training ended early on purpose (a non-finite loss) or failed; the message says
    why. `summary`: the outputs' summary when the epochs before the stop were written up."""

    def __init__(self, message: str, summary: dict | None = None):
        super().__init__(message)
        self.summary = summary


def _fit(
    config: Config,
    output: Path,
    storage_path: str,
    run_name: str,
    addresses: list[str],
    token_env: str | None,
    bank_actors: list[str],
):
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from trainer.train import LoopStarts, train_func

    c = config.train
    use_gpu = c.use_gpu
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= c.workers
        log.info(f"train.use_gpu not set: {'using' if use_gpu else 'no'} GPUs")
    # Counts the train loop's starts in this launch: Ray Train restarts every worker when
    # one fails (train.max_failures). Per launch, so the name is too.
    starts_name = f"{run_name}-loop-starts-{uuid.uuid4().hex[:8]}"
    starts = ray.remote(LoopStarts).options(name=starts_name, num_cpus=0).remote()
    # Writes the TensorBoard events into `output` as rank 0 sends them, on this node.
    events_name = f"{run_name}-tensorboard-{uuid.uuid4().hex[:8]}"
    events = start_event_writer(output, events_name)
    trainer = TorchTrainer(
        train_func,
        # Ray Train stores this: where the token is (bank.token_file is in the config), never the token.
        train_loop_config={
            "config": config.to_dict(),
            "addresses": addresses,
            "token_env": token_env,
            "bank_actors": bank_actors,
            "starts": starts_name,
            "event_writer": events_name,
        },
        scaling_config=ScalingConfig(
            num_workers=c.workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": c.cpus_per_worker, "GPU": 1} if use_gpu else {"CPU": c.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=c.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
            # Ray Train's INFO lines repeat every reported metric; our own
            # progress lines say what matters.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    start = time.perf_counter()
    try:
        result = trainer.fit()
    except Exception as error:  # Ray wraps worker errors (after FailureConfig's retries)
        bad = _bad_image(error)  # a worker's own line, not Ray's wrapping of it
        raise TrainingStopped(str(bad) if bad else f"training failed: {error}") from error
    finally:
        restarts = ray.get(starts.restarts.remote(), timeout=60)
        ray.kill(starts)
        # Each call flushed its points, and rank 0 waited for its last ones.
        ray.kill(events)
    return result, time.perf_counter() - start, restarts


def _bad_image(error: BaseException | None):
    """The BadImage a worker raised, found in Ray's wrapping of it; None for another error."""
    from trainer.images import BadImage

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        cause = getattr(error, "cause", None)  # a RayTaskError's: the worker's exception itself
        if isinstance(cause, BadImage):
            return cause
        if isinstance(error, BadImage) and cause is None:
            return error
        error = error.__cause__ or error.__context__
    return None
