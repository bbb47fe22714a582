"""kNN evaluation: of the training run's encoder, every `eval.every` epochs, and of an
exported encoder apart from training (`instdisc eval knn`: no bank, no Ray).

In a run, the test images' neighbours are the bank rows as they are
(``eval.source=bank``: the shards' merged top-k) or fresh features of the train images
(``eval.source=fresh``, `trainer.features.fresh_index`); either way the bank is only
read, and the counting is `trainer.knn`'s.

`instdisc eval knn` embeds the train split and the test split (un-augmented, in
batches) with the export and scores the same way. With an export that carries the
head, the features are the run's own embeddings, so the figure matches the run's kNN,
up to the bank's float16 rows. (`instdisc eval linear`, in `trainer/linear.py`, loads
and checks its inputs here too.)
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F

from trainer import distributed as dist
from trainer.bank_feed import BankFeed
from trainer.config import Config, ConfigError
from trainer.data import load_splits
from trainer.export import load_export
from trainer.features import embed, fresh_index
from trainer.images import BadImage, why_unevaluated
from trainer.knn import knn_accuracy, knn_correct, neighbours_correct

log = logging.getLogger(__name__)

_BATCH = 512
TEST_BATCH = 500
# Bank neighbours labelled at once (test queries x k): bounds evaluation's memory on any
# test set, and lets a streamed dataset read each row group's labels once per lot.
KNN_LABELS_AT_ONCE = 1 << 20


@torch.no_grad()
def evaluate_run(
    encoder: torch.nn.Module, data, feed: BankFeed, config: Config, device, source: str
) -> tuple[float, float, float]:
    """Weighted kNN (top-1, top-5, seconds) of the test set against `source`, all workers
    together (each scores its share of the test set): the bank rows as they are, or
    fresh features of the train images. `encoder` is the bare module (see
    `trainer.features`)."""
    start = time.perf_counter()
    c = config.eval
    k = min(c.k, data.rows)
    index = labels = None
    if source == "fresh":  # only for datasets in memory (config.validate)
        index = fresh_index(encoder, data, device, config.model.dim)
        labels = data.labels_at(torch.arange(data.rows)).to(index.device)
    correct, total = [0, 0], 0  # top-1, top-5; test images
    neighbours = []  # (sims, bank rows, test labels) per batch, labelled a bounded lot at a time
    encoder.eval()
    error = None
    try:
        for images, _, y in data.share("test", TEST_BATCH):
            queries = embed(encoder, images, device)
            total += len(y)
            if index is not None:
                found = knn_correct(index, labels, queries, y, data.num_classes, k, c.sigma)
            else:
                neighbours.append((*feed.topk(queries, k), y))
                if sum(idx.numel() for _, idx, _ in neighbours) < KNN_LABELS_AT_ONCE:
                    continue
                found, neighbours = _bank_neighbours_correct(neighbours, data, c.sigma), []
            correct = [correct[0] + found[0], correct[1] + found[1]]
        found = _bank_neighbours_correct(neighbours, data, c.sigma)
    except BadImage as bad:
        error, found = bad, (0, 0)
    finally:
        encoder.train()
    dist.stop_if_any(error)  # before the sum, which every worker must reach
    correct1, correct5, total = dist.all_reduce_sum([correct[0] + found[0], correct[1] + found[1], total])
    return correct1 / total, correct5 / total, time.perf_counter() - start


def _bank_neighbours_correct(neighbours: list[tuple], data, sigma: float) -> tuple[int, int]:
    """(correct top-1, correct top-5) of test batches' bank neighbours. Their train labels
    are read in one go: a streamed dataset reads them from the row groups those rows are in."""
    if not neighbours:
        return 0, 0
    labels = data.labels_at(torch.cat([idx.reshape(-1) for _, idx, _ in neighbours]))
    correct1 = correct5 = 0
    for (sims, idx, y), found in zip(neighbours, labels.split([idx.numel() for _, idx, _ in neighbours])):
        c1, c5 = neighbours_correct(sims, found.reshape(idx.shape), y, data.num_classes, sigma)
        correct1, correct5 = correct1 + c1, correct5 + c5
    return correct1, correct5


@torch.no_grad()
def embed_all(module, dataset, progress=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(unit features (N, F), labels (N,)) of every image of `dataset`, in index order."""
    features, labels = [], []
    for begin in range(0, len(dataset), _BATCH):
        images, _, y = dataset.__getitems__(list(range(begin, min(begin + _BATCH, len(dataset)))))
        features.append(F.normalize(module(images.float().div_(255)).float(), dim=1))
        labels.append(torch.as_tensor(y).long())
        if progress is not None:
            progress.update(len(y))
    return torch.cat(features), torch.cat(labels)


def load_for_eval(encoder_path: str, config: Config):
    """(module, export metadata, train split, test split) of an export (either format) and
    the dataset `data.*` names; NotAnExport or ConfigError, naming what is wrong, when the file is
    not an instdisc export or the images are not what it takes. `instdisc eval knn` and
    `instdisc eval linear` both start here."""
    module, metadata = load_export(encoder_path)
    train_set, test_set, split = load_splits(config)
    why = why_unevaluated(split, train_set.num_classes, test_set.num_classes if test_set is not None else None)
    if why:
        raise ConfigError(f"scoring an encoder needs labelled train and evaluation splits: {why}")
    channels, side = train_set.image_shape
    smallest, largest = metadata["min_image_size"], metadata["max_image_size"]
    if channels != metadata["in_channels"] or side < smallest or (largest is not None and side > largest):
        sides = f"{smallest}x{smallest} to {largest}x{largest}" if largest else f"at least {smallest}x{smallest}"
        raise ConfigError(
            f"--encoder {encoder_path} takes {metadata['in_channels']}-channel images of {sides} pixels; "
            f"data.name={config.data.name} gives {channels}-channel {side}x{side} (set data.image_size, "
            "or pick the matching export)"
        )
    return module, metadata, train_set, test_set


def evaluate_knn(encoder_path: str, config: Config) -> dict:
    from tqdm import tqdm

    module, metadata, train_set, test_set = load_for_eval(encoder_path, config)
    k = config.eval.k
    if k > len(train_set):  # as a run caps it (evaluate_run)
        log.info(f"eval.k={k} exceeds the {len(train_set)} images of the train split: k = {len(train_set)}")
        k = len(train_set)
    with tqdm(total=len(train_set) + len(test_set), unit="img", desc="embedding") as progress:
        train_features, train_labels = embed_all(module, train_set, progress)
        test_features, test_labels = embed_all(module, test_set, progress)
    top1, top5 = knn_accuracy(
        train_features, train_labels, test_features, test_labels, train_set.num_classes, k, config.eval.sigma
    )
    return {
        "knn_top1": top1,
        "knn_top5": top5,
        "k": k,
        "sigma": config.eval.sigma,
        "features": metadata["output"],
        "train_images": len(train_set),
        "test_images": len(test_set),
        "dataset": config.data.name,
    }
