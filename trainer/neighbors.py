"""The nearest training images of query images, by the run's encoder and the bank's
TopK, as a picture (PNG) with its numbers beside it (JSON): `instdisc neighbors`, and
the ``neighbors.png`` every run writes at its end.

A query is an evaluation-split image or an image file (through `image_to_chw`, at the
training side); its embedding is the encoder's unit feature, what the bank holds, so
its similarity to a row is the cosine TopK ranks by. The bank is a running one
(``bank.addresses``, or the run's own shard actors at its end) or the run's last
snapshot, served for the while (`trainer.snapshot_bank`).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from trainer import checkpoint
from trainer.config import Config, ConfigError, load_config
from trainer.features import embed
from trainer.gallery import open_gallery
from trainer.images import DECODE_ERRORS, NO_LABEL, BadImage, image_to_chw
from trainer.run_dir import CONFIG_FILE
from trainer.snapshot_bank import run_snapshots, served_snapshots

PICTURE = "neighbors.png"
RUN_QUERIES = RUN_K = 8  # the picture a run ends with: this many test images and neighbours each


@dataclass
class Query:
    source: str  # "test[i]" of the evaluation split, or the image file's path
    image: torch.Tensor  # uint8 (C, H, W)
    label: int | None  # None: a file, or an unlabelled split


def test_queries(test, split: str | None, n: int) -> list[Query]:
    """`n` evenly spaced images of the evaluation split `test`."""
    if test is None:
        raise ConfigError("--test: the run's data has no evaluation split; give query images with --images")
    if not 1 <= n <= len(test):
        raise ConfigError(f"--test {n}: the {split} split has {len(test)} images")
    indices = [j * len(test) // n for j in range(n)]
    images, labels = test.images_at(indices)
    return [
        Query(f"{split}[{i}]", image, int(label) if label != NO_LABEL else None)
        for i, image, label in zip(indices, images, labels.tolist())
    ]


def file_queries(paths: list[str], channels: int, side: int) -> list[Query]:
    """Image files as the training images were made: resized, centre-cropped, grey for a grey encoder."""
    queries = []
    for path in paths:
        try:
            with Image.open(path) as image:
                pixels = image_to_chw(image.convert("L") if channels == 1 else image, side)[:channels]
        except FileNotFoundError:
            raise ConfigError(f"--images {path}: no such file") from None
        except DECODE_ERRORS as error:
            raise BadImage(f"{path}: cannot decode the image ({type(error).__name__}: {error})") from None
        queries.append(Query(str(path), torch.from_numpy(np.array(pixels)), None))
    return queries


def nearest(encoder: torch.nn.Module, client, queries: list[Query], k: int) -> tuple[np.ndarray, np.ndarray]:
    """(similarities (Q, k) descending, bank rows (Q, k)) of the queries' k nearest rows."""
    if not 1 <= k <= client.rows:
        raise ConfigError(f"-k {k}: the bank holds {client.rows} rows")
    features = embed(encoder, torch.stack([q.image for q in queries]), "cpu")
    return client.topk(features.numpy(), k)


def write_neighbours(queries: list[Query], sims: np.ndarray, rows: np.ndarray, train, output: Path) -> Path:
    """The picture at `output` and its numbers beside it (same name, .json); returns the picture's path."""
    images, labels = train.images_at(rows.reshape(-1))
    labelled = train.num_classes > 0
    labels = labels.reshape(rows.shape).tolist() if labelled else None
    output.parent.mkdir(parents=True, exist_ok=True)
    _draw(queries, sims, images.reshape(*rows.shape, *images.shape[1:]), labels, output)
    entries = [
        {
            "source": q.source,
            "label": q.label,
            "rows": rows[i].tolist(),
            "similarities": [round(float(s), 6) for s in sims[i]],
            "labels": labels[i] if labels else None,
        }
        for i, q in enumerate(queries)
    ]
    output.with_suffix(".json").write_text(json.dumps({"k": rows.shape[1], "queries": entries}, indent=1))
    return output


def _draw(queries: list[Query], sims: np.ndarray, images: torch.Tensor, labels, path: Path) -> None:
    """One row per query: the query, then its neighbours captioned with similarity and
    label, a label other than the query's in red. One mosaic in one axes: a grid of
    axes, one per image, took seconds to lay out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, k = sims.shape
    side = images.shape[-1]
    band, gap = side * 3 // 4, max(1, side // 8)  # caption space above each image; space beside it
    cell_h, cell_w = side + band, side + gap
    mosaic = np.full((n * cell_h, (k + 1) * cell_w, 3), 255, np.uint8)
    captions = []  # (x, y, text, colour) in mosaic pixels
    for i, query in enumerate(queries):
        name = query.source if query.source.endswith("]") else Path(query.source).name[:16]
        row = [(query.image, name + ("" if query.label is None else f"\nlabel {query.label}"), "blue")]
        for j in range(k):
            caption, colour = f"{sims[i, j]:.3f}", "black"
            if labels is not None:
                caption += f"\nlabel {labels[i][j]}"
                colour = "red" if query.label is not None and labels[i][j] != query.label else "black"
            row.append((images[i, j], caption, colour))
        for j, (image, caption, colour) in enumerate(row):
            top, left = i * cell_h + band, j * cell_w
            pixels = image.expand(3, -1, -1) if image.shape[0] == 1 else image
            mosaic[top : top + side, left : left + side] = pixels.permute(1, 2, 0).numpy()
            captions.append((left + side / 2, top - band / 2, caption, colour))
    height = 1.25 * n * cell_h / cell_w + 0.6  # square images: 1.25 in a column
    fig = plt.figure(figsize=(1.25 * (k + 1), height))
    ax = fig.add_axes((0.0, 0.0, 1.0, 1 - 0.6 / height))
    ax.imshow(mosaic, interpolation="nearest", aspect="auto")
    ax.axis("off")
    for x, y, text, colour in captions:
        ax.text(x, y, text, ha="center", va="center", fontsize=7, color=colour)
    fig.suptitle(
        "query (blue), then its nearest training images\ncosine similarity, label (red: not the query's)", fontsize=9
    )
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _check_images(train, encoder, side: int, config: Config) -> None:
    if (train.channels, train.side) != (encoder.in_channels, side):
        raise ConfigError(
            f"the run's encoder takes {encoder.in_channels}-channel {side}x{side} images; data.name="
            f"{config.data.name} gives {train.channels}-channel {train.side}x{train.side}"
        )


def picture_of_run(config: Config, checkpoint_dir, addresses: list[str], token: str | None, output: Path) -> Path:
    """A run's own picture, at its end while its bank serves: RUN_QUERIES evenly spaced
    test images and their RUN_K nearest rows."""
    from bank_server.client import BankClient

    encoder, side = checkpoint.load_encoder(checkpoint_dir)
    train, test, split = open_gallery(config)
    _check_images(train, encoder, side, config)
    queries = test_queries(test, split, min(RUN_QUERIES, len(test)))
    with BankClient(addresses, token=token, timeout=config.bank.timeout, tls_ca=config.bank.tls_ca) as client:
        sims, rows = nearest(encoder, client, queries, min(RUN_K, client.rows))
    return write_neighbours(queries, sims, rows, train, output)


def run_config(run_dir: str | Path, overrides: list[str]) -> Config:
    """The config a run wrote (its config.yaml), `overrides` on top."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"--run {run_dir}: not a run folder (no {CONFIG_FILE} in it)")
    return load_config(path, overrides)


def neighbours_of_run(
    run_dir: str | Path,
    config: Config,
    images: list[str] | None,
    test: int | None,
    k: int,
    output: str | Path | None,
    token: str | None = None,
) -> Path:
    """`instdisc neighbors`: the run's checkpoint and `config` (`run_config`), queries
    from `images` or `test` evenly spaced test images, their `k` nearest bank rows."""
    run = Path(run_dir)
    state = checkpoint.load(run / "checkpoint")
    encoder, side = checkpoint.encoder_of(state)
    train, test_split, split = open_gallery(config)
    _check_images(train, encoder, side, config)
    queries = file_queries(images, encoder.in_channels, side) if images else test_queries(test_split, split, test)
    with _bank(config, run, state, len(train), token) as client:
        sims, rows = nearest(encoder, client, queries, k)
    return write_neighbours(queries, sims, rows, train, Path(output) if output else run / PICTURE)


@contextmanager
def _bank(config: Config, run: Path, state: dict, rows: int, token: str | None):
    """A client of `bank.addresses`, else of the run's last snapshot served for the while."""
    from bank_server.client import BankClient, BankRpcError

    b = config.bank
    if b.addresses:
        try:
            client = BankClient(b.addresses, token=token, timeout=b.timeout, tls_ca=b.tls_ca)
        except BankRpcError as error:
            raise ConfigError(f"bank.addresses: shard {error.address}: {error.code.name}: {error.details}") from None
        with client:
            yield client
        return
    folder = run_snapshots(run, b.snapshot_dir, state.get("bank_snapshot"))
    with served_snapshots(folder, rows, config.model.dim, b.dtype, b.timeout) as addresses:
        with BankClient(addresses, timeout=b.timeout) as client:
            yield client
