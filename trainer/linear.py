"""`instdisc eval linear`: the linear probe of an exported encoder.

A linear classifier on frozen features: the export's backbone (no projection head)
embeds the train and test splits of the dataset `data.*` names, un-augmented, once;
the features are L2-normalised and cached in the output folder under a key of the
encoder file's hash and the data config, so a second probe of the same encoder on the
same data skips the embedding. The layer is trained on the cached train features
with SGD (momentum 0.9, cosine learning rate, weight decay) and cross-entropy, for
`eval.linear_epochs` epochs in batches of `eval.linear_batch_size`, shuffled by a
generator seeded with `train.seed`: the same inputs give the same figures. Top-1 and
top-5 are on the test split. `linear.json` keeps them and what produced them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from trainer.config import Config, ConfigError
from trainer.evaluate import embed_all, load_for_eval

log = logging.getLogger(__name__)

CACHE_FOLDER = "linear-features"
RESULT = "linear.json"


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_key(encoder_sha256: str, config: Config) -> str:
    """The encoder's bytes and everything that decides which images are embedded (the
    subsets are seeded with train.seed)."""
    d = config.data
    data = {
        "name": d.name,
        "root": d.root,
        "subset": d.subset,
        "test_subset": d.test_subset,
        "image_size": d.image_size,
        "seed": config.train.seed,
    }
    return hashlib.sha256((encoder_sha256 + json.dumps(data, sort_keys=True)).encode()).hexdigest()[:24]


def cached_features(encoder_path: str, config: Config, output_dir: Path) -> tuple[dict, Path, bool]:
    """({train, train_labels, test, test_labels, num_classes, metadata}, its cache file,
    whether it was read back); computes and writes it when absent."""
    from tqdm import tqdm

    sha = file_sha256(encoder_path) if Path(encoder_path).exists() else ""
    path = output_dir / CACHE_FOLDER / f"{cache_key(sha, config)}.pt"
    if sha and path.exists():
        return torch.load(path, weights_only=True), path, True
    module, metadata, train_set, test_set = load_for_eval(encoder_path, config)
    if metadata["output"] != "backbone":
        raise ConfigError(
            f"--encoder {encoder_path} gives the projection head's {metadata['output']}s (it was "
            "exported with --head); the linear probe takes backbone features: export without --head"
        )
    with tqdm(total=len(train_set) + len(test_set), unit="img", desc="linear probe: embedding") as progress:
        # embed_all L2-normalises: the probe sees unit feature vectors.
        train, train_labels = embed_all(module, train_set, progress)
        test, test_labels = embed_all(module, test_set, progress)
    features = {
        "train": train,
        "train_labels": train_labels,
        "test": test,
        "test_labels": test_labels,
        "num_classes": int(train_set.num_classes),
        "metadata": json.dumps(metadata),
        "encoder_sha256": sha,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_suffix(".tmp")
    torch.save(features, temp)
    temp.replace(path)  # whole or absent: an interrupted write is not read back
    return features, path, False


def train_probe(
    train: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    epochs: int,
    lr: float,
    weight_decay: float,
    batch_size: int,
    seed: int,
    desc: str = "linear probe",
) -> torch.nn.Linear:
    """A linear layer fitted to (features, labels) by SGD with cross-entropy."""
    from tqdm import tqdm

    generator = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(train.shape[1], num_classes)
    torch.nn.init.zeros_(layer.weight)  # deterministic whatever the global seed
    torch.nn.init.zeros_(layer.bias)
    optimizer = torch.optim.SGD(layer.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    total = epochs * steps_per_epoch
    step = 0
    with tqdm(range(epochs), unit="epoch", desc=desc) as bar:
        for _ in bar:
            order = torch.randperm(len(train), generator=generator)
            loss_sum = 0.0
            for begin in range(0, len(train), batch_size):
                batch = order[begin : begin + batch_size]
                for group in optimizer.param_groups:
                    group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
                loss = F.cross_entropy(layer(train[batch]), labels[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += float(loss.detach()) * len(batch)
                step += 1
            bar.set_postfix(loss=f"{loss_sum / len(train):.4f}")
    return layer


@torch.no_grad()
def top_k_accuracy(layer: torch.nn.Linear, features: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> list[float]:
    ranked = layer(features).topk(max(ks), dim=1).indices
    hits = ranked == labels[:, None]
    return [float(hits[:, :k].any(dim=1).float().mean()) for k in ks]


def evaluate_linear(encoder_path: str, config: Config, output_dir: str | Path | None = None) -> dict:
    """Probe `encoder_path` on the data `config` names; writes `linear.json` into
    `output_dir` (default: the encoder's folder) and returns what it holds."""
    output = Path(output_dir) if output_dir is not None else Path(encoder_path).resolve().parent
    output.mkdir(parents=True, exist_ok=True)
    e = config.eval
    start = time.perf_counter()
    features, cache, reused = cached_features(encoder_path, config, output)
    log.info(f"linear probe: features {'read back from' if reused else 'cached in'} {cache}")
    num_classes = features["num_classes"]
    layer = train_probe(
        features["train"],
        features["train_labels"],
        num_classes,
        e.linear_epochs,
        e.linear_lr,
        e.linear_weight_decay,
        e.linear_batch_size,
        config.train.seed,
    )
    top1, top5 = top_k_accuracy(layer, features["test"], features["test_labels"], (1, min(5, num_classes)))
    (train_top1,) = top_k_accuracy(layer, features["train"], features["train_labels"], (1,))
    result = {
        "linear_top1": top1,
        "linear_top5": top5,
        "train_top1": train_top1,
        "epochs": e.linear_epochs,
        "lr": e.linear_lr,
        "weight_decay": e.linear_weight_decay,
        "batch_size": e.linear_batch_size,
        "seed": config.train.seed,
        "optimizer": "SGD momentum 0.9, cosine lr",
        "features": int(features["train"].shape[1]),
        "train_images": len(features["train"]),
        "test_images": len(features["test"]),
        "dataset": config.data.name,
        "encoder": str(encoder_path),
        "encoder_sha256": features["encoder_sha256"],
        "feature_cache": str(cache),
        "cache_reused": reused,
        "seconds": time.perf_counter() - start,
    }
    (output / RESULT).write_text(json.dumps(result, indent=2))
    return result
