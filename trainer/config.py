"""Typed configuration: one dataclass per concern, defaults < YAML file < key=value.

Unknown keys and values of the wrong type are errors that name the key. A run prints
the keys that differ from the defaults at start, writes the whole resolved config to
its output folder (``config.yaml``) and stores it with every checkpoint.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    pass


# The evaluation split's names, in the order the first one present is taken.
EVAL_SPLITS = ("test", "val", "valid", "validation")


@dataclass
class DataConfig:
    name: str = "fashion-mnist"
    root: str | None = None  # None: Debian's files / the download cache
    # Train on `subset` images (0 = all): the first of a seeded permutation, or for a
    # streamed Parquet dataset its evenly spaced rows (no random access needed).
    subset: int = 0
    test_subset: int = 0  # evaluate on this many test images, chosen the same way; 0 = all
    image_size: int = 32  # imagefolder / parquet images are resized to this
    download: bool = True
    # Decoding processes per train worker; None: 1 for streamed parquet on a GPU worker,
    # else 0 (decode in the worker: on CPU a second process competes for its cores).
    loader_workers: int | None = None
    # parquet: stream each worker's row groups (true), or decode the split into memory once (false).
    stream: bool = True
    shuffle_buffer: int = 4096  # streamed parquet: encoded rows mixed across row groups
    # The evaluation split: test, val, valid or validation; None: the first of those present.
    test_split: str | None = None
    # An image that does not decode: fail (stop the run naming it) or skip (leave it out,
    # log it once, count it). A skipped image's bank row is never a positive but may be
    # drawn as a negative; skip decodes in the train worker (data.loader_workers 0).
    on_bad_image: str = "fail"


@dataclass
class ModelConfig:
    arch: str = "small"  # small | resnet18 | resnet50
    width: int = 32  # channels of the first `small` layer
    cifar_stem: bool = True  # 3x3 stride-1 stem, no max-pool (ResNets on small images)
    dim: int = 128


@dataclass
class AugmentConfig:
    """What `trainer.augment.augment` does to each training image.

    The defaults keep what a label needs on any image kind: no horizontal flip (it turns
    b into d and 2 into a mirror glyph: on handwritten digits it cost 6.7 points of kNN)
    and crops of at least half the image (small images lose their object to a 0.2 crop).
    The natural-image configs (cifar10, imagenet) set the paper's 0.2 and 0.5.
    """

    crop_min: float = 0.5  # random resized crop, area scale in (crop_min, 1)
    jitter: float = 0.4  # brightness, contrast, saturation in [1-s, 1+s]; hue up to s/2 of a turn
    grayscale_p: float = 0.2  # colour images only
    flip_p: float = 0.0  # horizontal flip


@dataclass
class LossConfig:
    # infonce matched the exact softmax at K = 4096 (within 0.05 points of kNN on
    # Fashion-MNIST, 2 seeds) at NCE's cost per step; NCE at K = 4096 trailed the softmax
    # by 4 points, and the softmax reads every bank row each step, so it cannot scale.
    kind: str = "infonce"  # infonce | nce | softmax
    negatives: int = 4096  # K, for nce and infonce; capped at the bank's rows
    temperature: float = 0.1
    z_mode: str = "ema"  # nce: fixed (lemniscate, first batch) | ema
    # A slow average lags while the first epoch spreads the features out: Z stays too
    # large, the negatives' push fades and the bank collapses (seen with 0.99 from a
    # warm bank: kNN fell from 80 % to 51 % in one epoch). 0.9 tracks it.
    z_momentum: float = 0.9


@dataclass
class BankConfig:
    shards: int = 2
    dtype: str = "float16"
    momentum: float = 0.5  # v <- normalize(m v + (1 - m) f)
    addresses: list[str] = field(default_factory=list)  # empty: start shards as Ray actors
    token_file: str | None = None
    tls_ca: str | None = None
    # Where shard actors snapshot, a folder per run inside; None: <output-dir>/bank. `$VAR`s
    # are expanded on each shard's node (node-local disks: '$LOCAL_DISK/instdisc').
    snapshot_dir: str | None = None
    warm_start: bool = True  # fill the bank with one encoder pass before training
    # The workers on a node send their Steps as one, so a shard serves one Step per node
    # per training step, not one per worker (trainer.node_steps).
    one_step_per_node: bool = True
    seed: int = 0
    timeout: float = 60.0


@dataclass
class TrainConfig:
    # The run's length: train.epochs whole epochs when > 0, else train.steps optimizer
    # steps (ceil(steps / steps per epoch) epochs, the last one cut short). The default is
    # in steps so that a small dataset trains as long as a large one: 2,000 steps are
    # about 4 epochs of Fashion-MNIST and 190 of a 1,300-image set, which 40 steps (4
    # epochs of it) left below its untrained encoder.
    epochs: int = 0
    steps: int = 2000
    batch_size: int = 128  # global: split evenly over train.workers
    lr: float = 0.06
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # step (x0.1 at milestones) | cosine
    milestones: list[int] = field(default_factory=lambda: [120, 160])
    workers: int = 2
    use_gpu: bool | None = None  # None: use GPUs when the Ray cluster has one per worker
    cpus_per_worker: float = 1.0
    seed: int = 0
    log_every: int = 50  # steps between progress lines
    max_failures: int = 1
    # The run's bookkeeping (trainer.cadence), each in optimizer steps of the run. A
    # checkpoint and its bank snapshot describe the same step, and a resume goes on from
    # that exact step. None: every 30 minutes of training, in steps at this start's pace;
    # 0: at epoch ends. The last step always checkpoints.
    checkpoint_every: int | None = None
    # Every this many steps rewrite every bank row with the current encoder's feature of
    # its un-augmented image (lemniscate's recompute_memory); training continues from
    # those rows. None: every 10 epochs' steps (a refresh costs about 0.4 of an epoch's
    # training); 0: never. On the demo's 4 epochs, refreshing every epoch ended at 78.8 %
    # kNN (bank rows) against 74.6 % without.
    refresh_bank_every: int | None = None


@dataclass
class EvalConfig:
    # Steps between kNN evaluations (the last step always); None: as often as keeps
    # evaluation within 4 % of the training time, from its measured cost and pace.
    every: int | None = None
    k: int = 200
    sigma: float = 0.07
    # What the test images' neighbours are; evaluation never writes the bank either way.
    # bank: the bank rows as training left them (lemniscate's kNN every epoch);
    # fresh: the current encoder's features of the un-augmented train images, computed
    # for the evaluation and held in memory by every worker (N x model.dim floats).
    source: str = "bank"
    # Linear probe at the end of `instdisc train` (what `instdisc eval linear` runs): a
    # linear classifier on the frozen, L2-normalised backbone features of the run's
    # encoder.pt, trained with SGD (momentum 0.9, cosine lr) and cross-entropy.
    linear: bool = False
    linear_epochs: int = 30
    # Unit feature vectors need large weights for confident logits: lr 1 underfit
    # (71.7 % test, 73.8 % train top-1 on 5k Fashion-MNIST images), 30 reached 80.7 %.
    # On all 60k images batches of 1024 at lr 100 for 30 epochs scored 89.60 % in 10 s of
    # CPU; batches of 256 at lr 30 for 50 epochs, 89.75 % in 98 s.
    linear_lr: float = 100.0
    linear_weight_decay: float = 1e-6
    linear_batch_size: int = 1024


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    bank: BankConfig = field(default_factory=BankConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def differences(self) -> list[str]:
        """``key=value`` for every key that differs from the defaults, in the sections' order."""
        defaults = _flat(Config().to_dict())
        return [f"{key}={_words(value)}" for key, value in _flat(self.to_dict()).items() if value != defaults[key]]

    @classmethod
    def from_dict(cls, values: dict) -> Config:
        config = cls()
        _merge(config, values, "")
        config.validate()
        return config

    def validate(self) -> None:
        checks = [
            (self.loss.kind in ("nce", "infonce", "softmax"), "loss.kind must be 'nce', 'infonce' or 'softmax'"),
            (self.loss.negatives >= 1, "loss.negatives must be >= 1"),
            (self.loss.temperature > 0, "loss.temperature must be > 0"),
            (self.loss.z_mode in ("fixed", "ema"), "loss.z_mode must be 'fixed' or 'ema'"),
            (0 <= self.loss.z_momentum < 1, "loss.z_momentum must be in [0, 1)"),
            (0 <= self.bank.momentum < 1, "bank.momentum must be in [0, 1)"),
            (self.bank.dtype in ("float16", "float32"), "bank.dtype must be float16 or float32"),
            (self.bank.shards >= 1, "bank.shards must be >= 1"),
            (
                not (self.bank.snapshot_dir and self.bank.addresses),
                "bank.snapshot_dir is for the shard actors a run starts; running shards (bank.addresses) snapshot "
                "where their own --snapshot-dir says",
            ),
            (
                not self.bank.snapshot_dir
                or self.bank.snapshot_dir.startswith(("/", "~", "$"))
                or "://" in self.bank.snapshot_dir,
                f"bank.snapshot_dir={self.bank.snapshot_dir} must be absolute (or start with a $VARIABLE each node "
                "sets): shard actors do not run in this directory",
            ),
            *((_address_problem(a) is None, _address_problem(a)) for a in self.bank.addresses),
            (self.train.schedule in ("step", "cosine"), "train.schedule must be 'step' or 'cosine'"),
            (self.train.epochs >= 0, "train.epochs must be >= 0 (0: train.steps sets the run's length)"),
            (self.train.steps >= 0, "train.steps must be >= 0"),
            (self.train.epochs > 0 or self.train.steps > 0, "train.epochs or train.steps must be > 0"),
            (
                self.train.refresh_bank_every is None or self.train.refresh_bank_every >= 0,
                "train.refresh_bank_every must be >= 0 steps (0: never; unset: every 10 epochs)",
            ),
            (
                self.train.checkpoint_every is None or self.train.checkpoint_every >= 0,
                "train.checkpoint_every must be >= 0 steps (0: at epoch ends; unset: every 30 minutes)",
            ),
            (self.train.batch_size >= 1, "train.batch_size must be >= 1"),
            (self.train.workers >= 1, "train.workers must be >= 1"),
            (
                self.train.batch_size % self.train.workers == 0,
                f"train.batch_size={self.train.batch_size} must be a multiple of train.workers={self.train.workers}",
            ),
            (self.eval.every is None or self.eval.every >= 1, "eval.every must be >= 1 steps (unset: automatic)"),
            (self.eval.k >= 1, "eval.k must be >= 1"),
            (self.eval.source in ("bank", "fresh"), "eval.source must be 'bank' or 'fresh'"),
            (
                not (self.data.name == "parquet" and self.data.stream and self.eval.source == "fresh"),
                "eval.source=fresh holds every train image's feature on each worker; a streamed Parquet dataset "
                "evaluates against the bank (eval.source=bank), or set data.stream=false to hold it in memory",
            ),
            (self.data.shuffle_buffer >= 0, "data.shuffle_buffer must be >= 0 (0: row groups' own order)"),
            (self.data.loader_workers is None or self.data.loader_workers >= 0, "data.loader_workers must be >= 0"),
            (
                self.data.test_split is None or self.data.test_split in EVAL_SPLITS,
                f"data.test_split must be one of {', '.join(EVAL_SPLITS)} (unset: the first of them present)",
            ),
            (self.data.on_bad_image in ("fail", "skip"), "data.on_bad_image must be 'fail' or 'skip'"),
            (
                not (self.data.on_bad_image == "skip" and self.data.loader_workers),
                "data.on_bad_image=skip counts skipped images in the train worker: set data.loader_workers=0",
            ),
            (self.eval.linear_epochs >= 1, "eval.linear_epochs must be >= 1"),
            (self.eval.linear_lr > 0, "eval.linear_lr must be > 0"),
            (self.eval.linear_weight_decay >= 0, "eval.linear_weight_decay must be >= 0"),
            (self.eval.linear_batch_size >= 1, "eval.linear_batch_size must be >= 1"),
            (0 < self.augment.crop_min <= 1, "augment.crop_min must be in (0, 1]"),
            (0 <= self.augment.jitter < 1, "augment.jitter must be in [0, 1)"),
            (0 <= self.augment.grayscale_p <= 1, "augment.grayscale_p must be in [0, 1]"),
            (0 <= self.augment.flip_p <= 1, "augment.flip_p must be in [0, 1]"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


def _flat(values: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def _words(value) -> str:
    """A value as it is written on the command line."""
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value).lower() if isinstance(value, bool) or value is None else str(value)


def _address_problem(address: str) -> str | None:
    """Why a bank address is not host:port (a `{shard}` template included), or None."""
    host, _, port = address.rpartition(":")
    if host and port.isdigit() and 0 < int(port) < 65536:
        return None
    return f"bank.addresses: {address!r} is not host:port (for instance localhost:50051)"


def _check_type(value, annotation, key: str):
    """`value` converted to `annotation`, or ConfigError naming `key`."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(value, option, key)
            except ConfigError as error:
                errors.append(error)
        raise errors[0]
    if origin is list:
        (item,) = typing.get_args(annotation)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_check_type(v, item, key) for v in value]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                number = None
            if number is not None and number.is_integer():
                return int(number)
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} must be a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {annotation}")


# Keys that existed once: an old config that sets one is told what replaced it.
RETIRED = {
    "eval.refresh_bank": "evaluation no longer writes the bank; eval.source=bank|fresh says what kNN searches, "
    "and train.refresh_bank_every=N rewrites the bank every N optimizer steps as part of training",
    "bank.placement": "shard actors are always spread over the Ray nodes by their free memory",
    "train.overlap": "the bank's round trip always runs during the step's compute",
}


def _merge(target, values: dict, prefix: str) -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(type(target))
    for key, value in values.items():
        name = f"{prefix}{key}"
        if name in RETIRED:
            raise ConfigError(f"{name} is gone: {RETIRED[name]}")
        if key not in hints:
            known = ", ".join(f"{prefix}{k}" for k in hints)
            raise ConfigError(f"unknown config key {name!r} (known: {known})")
        if dataclasses.is_dataclass(hints[key]):
            _merge(getattr(target, key), value, f"{name}.")
        else:
            setattr(target, key, _check_type(value, hints[key], name))


def parse_overrides(pairs: list[str]) -> dict:
    """['train.lr=0.1', 'bank.addresses=a:1,b:2'] -> nested dict (values still strings)."""
    out: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r} is not key=value")
        key, value = pair.split("=", 1)
        *parents, leaf = key.strip().split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = _yaml(value, f"override {pair!r}") if value.strip() else value
    return out


def _deep_update(base: dict, update: dict) -> dict:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value
    return base


SHIPPED_CONFIGS = Path(__file__).parent / "configs"


def resolve_config_path(name: str | None) -> Path | None:
    """A YAML file's path, or the shipped config of that name (``fashion-mnist``); None
    (no --config) is the defaults alone."""
    if name is None:
        return None
    path = Path(name)
    if path.exists():
        return path
    shipped = SHIPPED_CONFIGS / f"{name}.yaml"
    if shipped.exists():
        return shipped
    choices = ", ".join(p.stem for p in sorted(SHIPPED_CONFIGS.glob("*.yaml")))
    raise ConfigError(f"--config {name}: no such file, and not a shipped config ({choices})")


def _yaml(text: str, where: str):
    """Parsed YAML; ConfigError naming `where` and, in a text of several lines, the line
    of a syntax error."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None and "\n" in text.strip() else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{where}{line}: not valid YAML ({problem})") from None


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    values: dict = {}
    if path:
        loaded = _yaml(Path(path).read_text(), str(path)) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of sections")
        values = loaded
    return Config.from_dict(_deep_update(values, parse_overrides(list(overrides))))
