"""Parquet image datasets of one file or many, known from their metadata alone.

``data.root`` is a directory, a glob or a pyarrow filesystem URI (``s3://bucket/set``,
``gs://...``, ``file:///...``). A split's files are found by name, anywhere below the
root (or among the glob's matches):

- ``train.parquet`` / ``test.parquet``;
- ``train-*.parquet`` / ``train_*.parquet`` (the Hugging Face layout
  ``data/train-00000-of-00042.parquet``);
- any ``*.parquet`` under a folder named ``train`` / ``test``.

Every file has an encoded-image column ``image`` (binary, or Hugging Face's struct
``{bytes, path}``) and an integer column ``label``; every file of a split has the same
types for them. An image's global index (its bank row) is its row position over the
split's files sorted by path: file order, then row group, then row. It comes from the
footers' row counts, so no image is read to know it, and the bank's size is the same
sum. A subset (``data.subset``) of a split is its evenly spaced rows, ``(j * n) // s``
for ``j < s``, which also needs no image read; subset position ``j`` is then the index.

`ParquetSplit` is that index. Reading is by row group (`read`), and every read error
names the file and the row group; problems the metadata shows (no file, a missing
column, types that differ between files) are raised before training starts.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import posixpath
from dataclasses import dataclass
from functools import cached_property

import numpy as np

IMAGE, LABEL = "image", "label"
LAYOUT_HELP = ("data.root must hold the split's Parquet files: train.parquet / test.parquet, train-*.parquet / "
               "test-*.parquet (also the Hugging Face layout data/train-00000-of-00042.parquet), or *.parquet in "
               "train/ and test/ folders; each with an encoded-image column 'image' and an integer column 'label'")


class ParquetDataError(ValueError):
    """A split's files are not what `data.name=parquet` reads; the message names the file."""


@dataclass(frozen=True)
class ParquetFile:
    path: str           # within the filesystem
    size: int           # bytes
    rows: int
    group_rows: tuple   # rows per row group


@dataclass(frozen=True)
class Piece:
    """Some rows of one row group: the split rows at ``offsets`` (positions within the
    row group) have global indices ``indices``."""
    file: int
    group: int
    offsets: np.ndarray
    indices: np.ndarray

    def __len__(self):
        return len(self.indices)


def _filesystem(root: str):
    """(pyarrow filesystem, path within it) of a local path or a URI."""
    import pyarrow.fs as pafs

    if "://" in root:
        return pafs.FileSystem.from_uri(root)
    import os

    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(root))


def _is_glob(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def _in_split(relative: str, split: str) -> bool:
    parts = relative.split("/")
    name = parts[-1]
    if not name.endswith(".parquet"):
        return False
    return (name == f"{split}.parquet" or name.startswith((f"{split}-", f"{split}_"))
            or split in parts[:-1])


def find_files(root: str, split: str) -> tuple[object, list[str]]:
    """(filesystem, the split's file paths sorted) under `root`; DatasetMissing, naming
    where and what was looked for, when none matches."""
    import pyarrow.fs as pafs

    filesystem, path = _filesystem(root)
    pattern = None
    if _is_glob(path):
        pattern, base = path, path
        while _is_glob(base):
            base = posixpath.dirname(base)
    else:
        base = path
    try:
        infos = filesystem.get_file_info(pafs.FileSelector(base, recursive=True))
    except (FileNotFoundError, OSError) as error:
        raise ParquetDataError(f"dataset 'parquet': cannot list {root} ({error}). {LAYOUT_HELP}") from error
    files = sorted(info.path for info in infos if info.type == pafs.FileType.File
                   and (pattern is None or fnmatch.fnmatch(info.path, pattern))
                   and _in_split(posixpath.relpath(info.path, base), split))
    if not files:
        from trainer.data import DatasetMissing

        raise DatasetMissing(f"dataset 'parquet': no {split} split under {root} (looked for {split}.parquet, "
                               f"{split}-*.parquet, {split}_*.parquet and {split}/*.parquet). {LAYOUT_HELP}")
    return filesystem, files


def _column_kinds(schema, path: str) -> tuple[str, str]:
    """The two columns' types as strings; ParquetDataError when one is missing or unusable."""
    import pyarrow as pa

    names = schema.names
    for column in (IMAGE, LABEL):
        if column not in names:
            raise ParquetDataError(f"{path} has no column {column!r} (columns: {names}). {LAYOUT_HELP}")
    image, label = schema.field(IMAGE).type, schema.field(LABEL).type
    encoded = (pa.types.is_binary(image) or pa.types.is_large_binary(image)
               or (pa.types.is_struct(image) and image.get_field_index("bytes") >= 0))
    if not encoded:
        raise ParquetDataError(f"{path}: column 'image' is {image}; it must hold encoded images (binary, or a "
                               "struct with a 'bytes' field as Hugging Face writes it)")
    if not pa.types.is_integer(label):
        raise ParquetDataError(f"{path}: column 'label' is {label}; it must be an integer class index")
    return str(image), str(label)


class ParquetSplit:
    """One split of a Parquet dataset, indexed from its files' footers."""

    def __init__(self, root: str, split: str, subset: int = 0):
        import pyarrow.parquet as pq

        self.root, self.split = root, split
        self.filesystem, paths = find_files(root, split)
        files, kinds = [], None
        for path in paths:
            try:
                with self.filesystem.open_input_file(path) as fh:
                    metadata = pq.ParquetFile(fh).metadata
                    schema = metadata.schema.to_arrow_schema()
            except Exception as error:  # noqa: BLE001 -- pyarrow raises several kinds; all mean unreadable
                raise ParquetDataError(f"{path}: not a readable Parquet file ({error})") from error
            found = _column_kinds(schema, path)
            if kinds is None:
                kinds, first = found, path
            elif found != kinds:
                raise ParquetDataError(f"{path} has image/label types {found[0]} / {found[1]}, but {first} has "
                                       f"{kinds[0]} / {kinds[1]}: the files of a split must share one schema")
            files.append(ParquetFile(path, self.filesystem.get_file_info(path).size, metadata.num_rows,
                                     tuple(metadata.row_group(g).num_rows for g in range(metadata.num_row_groups))))
        self.files = files
        self.total_rows = sum(f.rows for f in files)
        if subset < 0:
            raise ValueError(f"data.subset must be >= 0, got {subset}")
        self.rows = min(subset, self.total_rows) if subset else self.total_rows
        # (file, group, first global row) of every row group, in index order.
        self.groups = [(i, g) for i, f in enumerate(files) for g in range(len(f.group_rows))]
        sizes = [files[i].group_rows[g] for i, g in self.groups]
        self.group_start = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self._open: dict[int, object] = {}

    def __len__(self):
        return self.rows

    # -- the index -----------------------------------------------------------------

    def piece(self, group: int) -> Piece:
        """The kept rows of row group `group` (all of them without a subset)."""
        file, g = self.groups[group]
        lo, hi = int(self.group_start[group]), int(self.group_start[group + 1])
        if self.rows == self.total_rows:
            indices = np.arange(lo, hi, dtype=np.int64)
            rows = indices
        else:  # subset position j keeps row (j * n) // s
            n, s = self.total_rows, self.rows
            indices = np.arange(-(-lo * s // n), -(-hi * s // n), dtype=np.int64)
            rows = indices * n // s
        return Piece(file, g, rows - lo, indices)

    def pieces(self) -> list[Piece]:
        return [self.piece(group) for group in range(len(self.groups))]

    def fingerprint(self) -> dict:
        """What identifies the split: its files (relative to the root), their sizes and
        row counts, and the subset. A checkpoint stores it; resume compares."""
        files = [[f.path, f.size, f.rows] for f in self.files]
        digest = hashlib.sha256(repr((files, self.rows)).encode()).hexdigest()[:16]
        return {"root": self.root, "split": self.split, "files": len(files), "rows": self.rows,
                "total_rows": self.total_rows, "sha256": digest,
                "file_list": files[:20] + ([["...", len(files) - 20]] if len(files) > 20 else [])}

    @cached_property
    def num_classes(self) -> int:
        """Largest label + 1: from the row groups' statistics when every one has them,
        else from the label column (read alone)."""
        import pyarrow.parquet as pq

        top = -1
        for i, f in enumerate(self.files):
            with self.filesystem.open_input_file(f.path) as fh:
                metadata = pq.ParquetFile(fh).metadata
                column = metadata.schema.to_arrow_schema().get_field_index(LABEL)
                for g in range(metadata.num_row_groups):
                    stats = metadata.row_group(g).column(column).statistics
                    if stats is None or not stats.has_min_max:
                        return int(max(self._labels_of_file(i).max(initial=-1) for i in range(len(self.files)))) + 1
                    top = max(top, int(stats.max))
        return top + 1

    def _labels_of_file(self, file: int) -> np.ndarray:
        return np.concatenate([self.read(file, g, [LABEL])[LABEL] for g in range(len(self.files[file].group_rows))])

    # -- reading -------------------------------------------------------------------

    def read(self, file: int, group: int, columns: list[str]) -> dict:
        """One row group's `columns` as numpy/Python values: ``label`` an int64 array,
        ``image`` a list of encoded bytes. Errors name the file and the row group."""
        import pyarrow.parquet as pq

        path = self.files[file].path
        try:
            reader = self._open.get(file)
            if reader is None:
                reader = pq.ParquetFile(self.filesystem.open_input_file(path))
                self._open = {file: reader}  # one file open at a time: pieces come mostly in file order
            table = reader.read_row_group(group, columns=columns)
        except Exception as error:  # noqa: BLE001 -- whatever pyarrow or the filesystem raised
            self._open = {}
            raise ParquetDataError(f"{path}: cannot read row group {group} ({type(error).__name__}: {error})") from error
        out = {}
        if LABEL in columns:
            out[LABEL] = table.column(LABEL).to_numpy().astype(np.int64, copy=False)
        if IMAGE in columns:
            images = table.column(IMAGE).combine_chunks()
            if hasattr(images.type, "get_field_index") and images.type.get_field_index("bytes") >= 0:
                images = images.field("bytes")  # the Hugging Face layout {bytes, path}
            out[IMAGE] = images.to_pylist()
        return out

    def read_piece(self, piece: Piece, columns=(IMAGE, LABEL)) -> dict:
        values = self.read(piece.file, piece.group, list(columns))
        return {k: [v[i] for i in piece.offsets] if k == IMAGE else v[piece.offsets] for k, v in values.items()}

    def labels_at(self, indices: np.ndarray) -> np.ndarray:
        """Labels of global indices, reading only the label column of the row groups
        they fall in (memory: the indices asked for and one row group's labels)."""
        indices = np.asarray(indices, dtype=np.int64)
        flat = indices.reshape(-1)
        out = np.empty(len(flat), dtype=np.int64)
        n, s = self.total_rows, self.rows
        rows = flat if s == n else flat * n // s
        group_of = np.searchsorted(self.group_start, rows, side="right") - 1
        for group in np.unique(group_of):
            file, g = self.groups[group]
            labels = self.read(file, g, [LABEL])[LABEL]
            mine = group_of == group
            out[mine] = labels[rows[mine] - self.group_start[group]]
        return out.reshape(indices.shape)

    def close(self) -> None:
        self._open = {}

    def __getstate__(self):  # DataLoader processes get the index, not the open file
        state = self.__dict__.copy()
        state["_open"] = {}
        return state


def decode(encoded: list[bytes], size: int) -> np.ndarray:
    """Encoded images -> uint8 (n, 3, size, size), each by `trainer.data.image_to_chw`."""
    from PIL import Image

    from trainer.data import image_to_chw

    out = np.empty((len(encoded), 3, size, size), dtype=np.uint8)
    for i, data in enumerate(encoded):
        out[i] = image_to_chw(Image.open(io.BytesIO(data)), size)
    return out
