"""`instdisc eval knn`: weighted kNN of an exported encoder on any dataset `data.*` can
load, apart from training: no bank, no Ray. (`instdisc eval linear`, in
`trainer/linear.py`, loads and checks its inputs here too.)

The encoder embeds the train split and the test split (un-augmented, in batches);
each test feature's k nearest train features (cosine) vote with weight exp(sim / sigma)
(`trainer.knn`, the same functions the training run's evaluation uses). With an export
that carries the head, the features are the run's own embeddings, so the figure
matches the run's kNN, up to the bank's float16 rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.config import Config, ConfigError
from trainer.knn import correct_at, weighted_knn_scores

_BATCH = 512


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


def knn_correct(train_features, train_labels, test_features, test_labels, num_classes: int, k: int,
                sigma: float) -> tuple[int, int]:
    """How many test features the weighted kNN against the train features gets right,
    at top-1 and top-5 (the training run's `eval.source=fresh` sums these over workers)."""
    correct1 = correct5 = 0
    for begin in range(0, len(test_features), _BATCH):
        queries = test_features[begin:begin + _BATCH]
        sims, idx = (queries @ train_features.T).topk(k, dim=1)
        scores = weighted_knn_scores(sims, train_labels[idx], num_classes, sigma)
        c1, c5 = correct_at(scores, test_labels[begin:begin + _BATCH], (1, min(5, num_classes)))
        correct1, correct5 = correct1 + c1, correct5 + c5
    return correct1, correct5


def knn_accuracy(train_features, train_labels, test_features, test_labels, num_classes: int, k: int,
                 sigma: float) -> tuple[float, float]:
    """Weighted kNN top-1 and top-5 of the test features against the train features."""
    correct1, correct5 = knn_correct(train_features, train_labels, test_features, test_labels, num_classes, k, sigma)
    return correct1 / len(test_features), correct5 / len(test_features)


def load_for_eval(encoder_path: str, config: Config):
    """(module, export metadata, train split, test split) of an export and the dataset
    `data.*` names; NotAnExport or ConfigError, naming what is wrong, when the file is
    not an instdisc export or the images are not what it takes. `instdisc eval knn` and
    `instdisc eval linear` both start here."""
    from trainer.export import load_export
    from trainer.data import load_datasets

    module, metadata = load_export(encoder_path)
    train_set, test_set = load_datasets(config)
    channels, side = train_set[0][0].shape[0], train_set[0][0].shape[1]
    if (channels, side) != (metadata["in_channels"], metadata["image_size"]):
        raise ConfigError(f"--encoder {encoder_path} takes {metadata['in_channels']}-channel "
                          f"{metadata['image_size']}x{metadata['image_size']} images; data.name={config.data.name} "
                          f"gives {channels}-channel {side}x{side} (set data.image_size, or pick the matching export)")
    return module, metadata, train_set, test_set


def evaluate_knn(encoder_path: str, config: Config) -> dict:
    from tqdm import tqdm

    module, metadata, train_set, test_set = load_for_eval(encoder_path, config)
    k = config.eval.k
    if k > len(train_set):
        raise ConfigError(f"eval.k={k} exceeds the {len(train_set)} images of the train split")
    with tqdm(total=len(train_set) + len(test_set), unit="img", desc="embedding") as progress:
        train_features, train_labels = embed_all(module, train_set, progress)
        test_features, test_labels = embed_all(module, test_set, progress)
    top1, top5 = knn_accuracy(train_features, train_labels, test_features, test_labels, train_set.num_classes, k,
                              config.eval.sigma)
    return {"knn_top1": top1, "knn_top5": top5, "k": k, "sigma": config.eval.sigma, "features": metadata["output"],
            "train_images": len(train_set), "test_images": len(test_set), "dataset": config.data.name}
