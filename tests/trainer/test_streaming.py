"""Streamed Parquet datasets: the index from metadata, each worker's share (also of
Parquet decoded into memory), bounded reading, and bad input named by file. Every
image written here carries its own global index in its pixels, so a test can tell
which row a reader really returned."""

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from trainer.config import Config, ConfigError
from trainer.data import load_dataset
from trainer.gallery import ParquetImages, open_gallery
from trainer.images import BadImage, DatasetMissing
from trainer.input import describe, open_input
from trainer.parquet import ParquetDataError, ParquetSplit, decode
from trainer.streaming import StreamedInput

LABELS = 7


def png(index: int) -> bytes:
    pixels = np.zeros((8, 8), np.uint8)
    pixels[0, 0], pixels[0, 1] = index % 256, index // 256
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def index_of(image: torch.Tensor) -> int:
    return int(image[0, 0, 0]) + 256 * int(image[0, 0, 1])


def write_split(folder: Path, split: str, sizes: list[int], group_rows: int, start: int = 0) -> None:
    """Hugging Face layout: folder/data/<split>-0000i-of-0000n.parquet."""
    (folder / "data").mkdir(parents=True, exist_ok=True)
    for i, size in enumerate(sizes):
        rows = range(start, start + size)
        table = pa.table(
            {
                "image": [{"bytes": png(r), "path": None} for r in rows],
                "label": np.array([r % LABELS for r in rows], np.int64),
            }
        )
        pq.write_table(
            table, folder / "data" / f"{split}-{i:05d}-of-{len(sizes):05d}.parquet", row_group_size=group_rows
        )
        start += size


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("streamed")
    write_split(folder, "train", [130, 130, 130], group_rows=50)  # 9 row groups, some short
    write_split(folder, "test", [45, 45], group_rows=20)
    return folder


def config(root, *overrides) -> Config:
    c = Config.from_dict(
        {
            "data": {"name": "parquet", "root": str(root), "image_size": 8, "loader_workers": 0},
            "train": {"batch_size": 30, "workers": 3},
        }
    )
    for key, value in (o.split("=") for o in overrides):
        section, name = key.split(".")
        value = {"true": True, "false": False}.get(value, value)
        setattr(getattr(c, section), name, type(getattr(getattr(c, section), name))(value))
    return c


# The same tests hold for both forms a worker reads Parquet in: streamed, and decoded into memory.
FORMS = {"streamed": ("data.stream=true",), "in-memory": ("data.stream=false",)}


def test_the_index_comes_from_metadata_in_file_order(dataset):
    split = ParquetSplit(str(dataset), "train")
    assert (len(split), len(split.files), len(split.groups)) == (390, 3, 9)
    assert split.num_classes == LABELS
    assert [f.path.rsplit("/", 1)[1] for f in split.files] == [f"train-0000{i}-of-00003.parquet" for i in range(3)]
    rows = [split.read_piece(p) for p in split.pieces()]
    indices = np.concatenate([r["index"] for r in rows])
    assert indices.tolist() == list(range(390))
    assert np.concatenate([r["label"] for r in rows]).tolist() == [i % LABELS for i in range(390)]
    asked = np.array([[389, 0], [131, 250]])
    assert split.labels_at(asked).tolist() == [[389 % LABELS, 0], [131 % LABELS, 250 % LABELS]]
    shape = describe(config(dataset))
    assert (shape.train_rows, shape.test_rows, shape.channels, shape.side, shape.num_classes) == (390, 90, 3, 8, 7)


def test_images_are_read_by_global_index_from_their_row_groups_only(dataset):
    # What a picture of bank neighbours shows: rows in any order, repeated, across files.
    split = ParquetSplit(str(dataset), "train")
    asked = np.array([389, 0, 131, 250, 0, 49, 50])
    images, labels = split.images_at(asked, 8)
    assert [index_of(torch.from_numpy(image)) for image in images] == asked.tolist()
    assert labels.tolist() == (asked % LABELS).tolist()
    assert images.shape == (7, 3, 8, 8)
    subset = ParquetSplit(str(dataset), "train", subset=100)
    assert [index_of(torch.from_numpy(image)) for image in subset.images_at(np.array([99, 1]), 8)[0]] == [386, 3]
    train, test, split_name = open_gallery(config(dataset, "data.test_subset=10"))
    assert isinstance(train, ParquetImages) and (len(train), len(test), split_name) == (390, 10, "test")
    images, labels = test.images_at([9, 0])
    assert [index_of(image) for image in images] == [81, 0] and labels.tolist() == [81 % LABELS, 0]


@pytest.mark.parametrize("form", FORMS)
def test_every_worker_takes_the_same_steps_and_each_row_at_most_once_per_epoch(dataset, form):
    c = config(dataset, *FORMS[form])
    workers = [open_input(c, rank, 3) for rank in range(3)]
    assert {w.batches_per_epoch() for w in workers} == {390 // 30}
    orders = []
    for epoch in range(2):
        seen = []
        for w in workers:
            batches = list(w.epoch_batches(epoch))
            assert len(batches) == 13 and all(len(idx) == 10 for _, idx, _ in batches)
            for images, idx, labels in batches:
                assert [index_of(im) for im in images] == idx.tolist()  # the pixels are the rows named
                assert labels.tolist() == [i % LABELS for i in idx.tolist()]
                seen += idx.tolist()
        assert len(seen) == len(set(seen)) == 13 * 30
        orders.append(seen)
    assert orders[0] != orders[1]  # a new order each epoch
    again = [idx for _, idx, _ in open_input(c, 1, 3).epoch_batches(1)]
    assert torch.cat(again).tolist() == orders[1][130:260]  # a function of the seed and the epoch: a resume replays it


@pytest.mark.parametrize(
    "overrides",
    [
        ("data.stream=false",),
        ("data.stream=true",),
        # Chunks of 256 rows: loader processes that pass whole rounds over undecoded.
        ("data.stream=true", "data.loader_workers=2", "data.shuffle_buffer=300"),
        ("data.stream=true", "data.shuffle_buffer=0"),
    ],
)
def test_an_epoch_resumed_after_k_batches_goes_on_with_the_same_batches(tmp_path_factory, overrides):
    # What a resume from a mid-epoch checkpoint reads: the uninterrupted epoch's batches
    # after the first k, by global index, on every worker.
    folder = tmp_path_factory.mktemp("long")
    write_split(folder, "train", [1300, 1100], group_rows=200)
    c = config(folder, *overrides, "train.workers=2", "train.batch_size=40")
    for rank in range(2):
        whole = [idx.tolist() for _, idx, _ in open_input(c, rank, 2).epoch_batches(1)]
        assert len(whole) == 2400 // 40
        for k in (1, 59) if "data.loader_workers=2" in overrides else (1, 31, 59):
            resumed = [idx.tolist() for _, idx, _ in open_input(c, rank, 2).epoch_batches(1, skip=k)]
            assert resumed == whole[k:], (rank, k)


@pytest.mark.parametrize("form", FORMS)
def test_the_shares_cover_each_split_exactly_once(dataset, form):
    # In memory through a loader process (the streamed ones have a test of their own).
    c = config(dataset, *FORMS[form], *(["data.loader_workers=1"] if form == "in-memory" else []))
    for split, n in (("train", 390), ("test", 90)):
        seen = []
        for rank in range(3):
            for images, idx, _ in open_input(c, rank, 3).share(split, 25):
                assert [index_of(im) for im in images] == idx.tolist()
                seen += idx.tolist()
        assert sorted(seen) == list(range(n))


def test_a_subset_is_evenly_spaced_and_indexed_by_its_position(dataset):
    split = ParquetSplit(str(dataset), "train", subset=100)
    read = [split.read_piece(p) for p in split.pieces()]
    assert np.concatenate([r["index"] for r in read]).tolist() == list(range(100))
    rows = [index_of(torch.from_numpy(image)) for r in read for image in decode(r["image"], 8)[0]]
    assert rows == [j * 390 // 100 for j in range(100)]
    assert split.labels_at(np.array([99])).tolist() == [(99 * 390 // 100) % LABELS]
    shape = describe(config(dataset, "data.subset=100", "data.test_subset=10"))
    assert (shape.train_rows, shape.test_rows) == (100, 10)


def test_loader_processes_stream_the_same_rows(dataset):
    one = StreamedInput(config(dataset, "data.loader_workers=2"), 1, 3)
    rows = [idx for _, idx, _ in one.epoch_batches(3)]
    assert len(rows) == 13 and len(set(torch.cat(rows).tolist())) == 13 * 10
    in_process = StreamedInput(config(dataset), 1, 3)
    planned = in_process.epoch_pieces(3)
    assert set(torch.cat(rows).tolist()) <= {int(i) for p in planned for i in in_process.train.rows_of(p)[1]}
    assert len(planned) <= len(in_process.train.groups) + 2  # an epoch is described by row groups, not rows


def test_one_file_per_split_and_uris_and_globs_still_work(tmp_path, dataset):
    for split, n in (("train", 40), ("test", 10)):
        table = pa.table({"image": [png(i) for i in range(n)], "label": np.arange(n) % LABELS})
        pq.write_table(table, tmp_path / f"{split}.parquet")
    assert len(ParquetSplit(str(tmp_path), "train")) == 40
    assert len(load_dataset("parquet", str(tmp_path), image_size=8)) == 40  # data.stream=false
    assert len(ParquetSplit(f"file://{tmp_path}", "test")) == 10
    assert len(ParquetSplit(str(dataset / "data" / "train-0000[01]-*.parquet"), "train")) == 260


def test_bad_input_is_named_before_training(tmp_path):
    (tmp_path / "data").mkdir()
    good = pa.table({"image": [png(0)], "label": np.array([0], np.int64)})
    pq.write_table(good, tmp_path / "data" / "train-00000-of-00002.parquet")
    pq.write_table(
        pa.table({"image": [png(1)], "label": np.array([0.5])}), tmp_path / "data" / "train-00001-of-00002.parquet"
    )
    with pytest.raises(ParquetDataError, match=r"train-00001-of-00002.parquet: column 'label' is double"):
        ParquetSplit(str(tmp_path), "train")
    pq.write_table(
        pa.table({"image": [png(1)], "label": np.array([1], np.int32)}),
        tmp_path / "data" / "train-00001-of-00002.parquet",
    )
    with pytest.raises(
        ParquetDataError,
        match=r"train-00001-of-00002.parquet has image/label types .* int32.*"
        r"train-00000-of-00002.parquet has .* int64",
    ):
        ParquetSplit(str(tmp_path), "train")
    pq.write_table(
        pa.table({"picture": [png(1)], "label": np.array([1], np.int64)}),
        tmp_path / "data" / "train-00001-of-00002.parquet",
    )
    with pytest.raises(ParquetDataError, match=r"train-00001-of-00002.parquet has no column 'image'"):
        ParquetSplit(str(tmp_path), "train")
    with pytest.raises(DatasetMissing, match=r"no test split under .*test-\*.parquet"):
        ParquetSplit(str(tmp_path), "test")
    with pytest.raises(ConfigError, match="eval.source=fresh"):
        Config.from_dict({"data": {"name": "parquet", "root": str(tmp_path)}, "eval": {"source": "fresh"}})


def test_a_file_unreadable_mid_epoch_is_named(tmp_path):
    write_split(tmp_path, "train", [64, 64], group_rows=16)
    write_split(tmp_path, "test", [8], group_rows=8)
    streamed = StreamedInput(config(tmp_path, "train.workers=1", "train.batch_size=16"), 0, 1)
    broken = tmp_path / "data" / "train-00001-of-00002.parquet"
    data = broken.read_bytes()
    broken.write_bytes(data[:4] + b"\0" * (len(data) - 4096) + data[-4092:])  # footer kept, pages gone
    with pytest.raises(ParquetDataError, match=r"train-00001-of-00002.parquet: cannot read row group"):
        list(streamed.epoch_batches(0))


def test_split_rules_and_the_fingerprint_hold_however_the_root_is_spelled(tmp_path):
    for path in (
        "a/train-00000-of-00001.parquet",
        "a/test.parquet",
        "test/train-extra.parquet",
        "train/part-0.parquet",
        "a/old/train-stale.parquet",
    ):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"image": [png(0)], "label": np.array([0], np.int64)}), tmp_path / path)
    found = [f.relative for f in ParquetSplit(str(tmp_path), "train").files]
    assert found == [
        "a/old/train-stale.parquet",
        "a/train-00000-of-00001.parquet",
        "test/train-extra.parquet",
        "train/part-0.parquet",
    ]  # the file name decides before the folder
    assert [f.relative for f in ParquetSplit(str(tmp_path), "test").files] == ["a/test.parquet"]
    assert len(ParquetSplit(str(tmp_path / "a" / "*.parquet"), "train").files) == 1  # '*' stays in its folder
    spellings = [str(tmp_path), f"{tmp_path}/", f"file://{tmp_path}"]
    assert len({ParquetSplit(root, "train").fingerprint()["sha256"] for root in spellings}) == 1
    pq.write_table(
        pa.table({"image": [png(0), png(1)], "label": np.array([0, 1], np.int64)}),
        tmp_path / "train" / "part-0.parquet",
    )
    assert (
        ParquetSplit(str(tmp_path), "train").fingerprint()["sha256"]
        != ParquetSplit(spellings[0], "train", subset=3).fingerprint()["sha256"]
    )


def test_hugging_face_paths_nulls_and_undecodable_images_are_named(tmp_path):
    # A filled-in 'path' before 'label': the label's statistics are found by column path.
    table = pa.table(
        {
            "image": [{"bytes": png(i), "path": f"img_{i}.png"} for i in range(4)],
            "label": np.array([0, 5, 2, 1], np.int64),
        }
    )
    pq.write_table(table, tmp_path / "train.parquet")
    assert ParquetSplit(str(tmp_path), "train").num_classes == 6
    pq.write_table(
        pa.table({"image": [png(0), png(1)], "label": pa.array([0, None], pa.int64())}), tmp_path / "test.parquet"
    )
    with pytest.raises(ParquetDataError, match=r"test.parquet: row group 0 has 1 null label"):
        ParquetSplit(str(tmp_path), "test")
    pq.write_table(
        pa.table({"image": [{"bytes": None, "path": "elsewhere.png"}], "label": np.array([0])}),
        tmp_path / "test.parquet",
    )
    # (A column of nulls only has no statistics: this one is caught when read.)
    with pytest.raises(ParquetDataError, match=r"test.parquet: row group 0 has 1 image\(s\) without bytes .*embed"):
        load_dataset("parquet", str(tmp_path), train=False, image_size=8)
    pq.write_table(pa.table({"image": [png(0), b"not an image"], "label": np.array([0, 1])}), tmp_path / "test.parquet")
    with pytest.raises(BadImage, match=r"test.parquet, row group 0, row 1: cannot decode the image"):
        load_dataset("parquet", str(tmp_path), train=False, image_size=8)
    with pytest.raises(BadImage, match=r"test.parquet, row group 0, row 1: cannot decode the image"):
        ParquetSplit(str(tmp_path), "test").images_at(np.array([0, 1]), 8)
