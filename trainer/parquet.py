"""The Parquet dataset kind: which files make a split, the index from their footers,
reading by row group, decoding, and a split decoded into memory (`load_split`, for
``data.stream=false`` and `instdisc eval`). Streaming it to workers is `trainer.streaming`'s.

``data.root`` is a directory, a glob or a pyarrow filesystem URI (``s3://bucket/set``,
``gs://...``, ``file:///...``). A split's files are found by name, anywhere below the
root (or among the glob's matches, ``*`` matching within one path segment); the
splits are ``train`` and the evaluation split, the first of ``test``, ``val``,
``valid``, ``validation`` present (or ``data.test_split``):

- ``<split>.parquet``, ``<split>-*.parquet`` or ``<split>_*.parquet`` (the Hugging Face
  layout ``data/train-00000-of-00042.parquet``, ``data/validation-00000-of-00001.parquet``);
- else, a ``*.parquet`` whose nearest folder named after a split is ``<split>/``.

The file name decides first, so ``test/train-extra.parquet`` is train's. Every file
has an encoded-image column ``image`` (binary, or Hugging Face's struct ``{bytes,
path}`` with the bytes filled in) and, optionally, an integer column ``label`` (class
indices as they are, 0 to classes - 1; without it the split is unlabelled), with the
same types in every file of a split and no nulls. An image's global index (its bank row) is its
row position over the split's files sorted by path: file order, then row group, then
row. It comes from the footers' row counts, so no image is read to know it, and the
bank's size is the same sum. A subset (``data.subset``) of a split is its evenly
spaced rows, ``(j * n) // s`` for ``j < s``, which also needs no image read; subset
position ``j`` is then the index.

`ParquetSplit` is that index, in memory of the order of its row groups, never of its
rows. Reading is by row group (`read_piece`), and every read error names the file and
the row group; what the metadata shows (no file, a missing column, types that differ,
nulls) is refused when the split is opened, before training starts.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import os
import posixpath
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from trainer.config import EVAL_SPLITS
from trainer.images import (
    DECODE_ERRORS,
    NO_LABEL,
    BadImages,
    DataError,
    DatasetMissing,
    InMemoryImages,
    choose_eval_split,
    image_to_chw,
)

IMAGE, LABEL, INDEX = "image", "label", "index"
SPLITS = ("train", *EVAL_SPLITS)
LAYOUT_HELP = (
    "data.root must hold the splits' Parquet files: train.parquet and test.parquet (or val, valid, "
    "validation), train-*.parquet / validation-*.parquet (also the Hugging Face layout "
    "data/train-00000-of-00042.parquet), or *.parquet in train/ and test/ (val/, ...) folders; each "
    "with an encoded-image column 'image' and, for evaluation, an integer class-index column 'label'"
)


class ParquetDataError(DataError):
    """A split's files are not what `data.name=parquet` reads; the message names the file."""


@dataclass(frozen=True)
class SplitFile:
    path: str  # within the filesystem
    relative: str  # below the listed root: what the fingerprint hashes
    size: int  # bytes
    rows: int
    group_rows: tuple  # rows per row group


@dataclass(frozen=True)
class Piece:
    """Rows [lo, hi) of row group `group`'s kept rows, taken in the order `seed`
    permutes them (None: file order). Knowing a piece costs nothing per row."""

    group: int
    lo: int
    hi: int
    seed: tuple | None = None

    def __len__(self):
        return self.hi - self.lo


def _filesystem(root: str):
    """(pyarrow filesystem, path within it) of a local path or a URI."""
    import pyarrow.fs as pafs

    if "://" in root:
        try:
            return pafs.FileSystem.from_uri(root)
        except Exception as error:  # noqa: BLE001 -- pyarrow's URI errors: ArrowInvalid, OSError
            raise ParquetDataError(
                f"dataset 'parquet': data.root={root} is not a filesystem URI pyarrow can open ({error})"
            ) from error
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(root))


def _is_glob(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def split_of(relative: str) -> str | None:
    """The split a file below the root belongs to, by its name first, then by its
    nearest folder named after a split; None for neither (or not Parquet)."""
    parts = relative.split("/")
    name = parts[-1]
    if not name.endswith(".parquet"):
        return None
    for split in SPLITS:
        if name == f"{split}.parquet" or name.startswith((f"{split}-", f"{split}_")):
            return split
    return next((part for part in reversed(parts[:-1]) if part in SPLITS), None)


def _matches(path: str, pattern: str) -> bool:
    """A glob matched segment by segment: ``*`` never crosses a ``/``."""
    parts, wanted = path.split("/"), pattern.split("/")
    return len(parts) == len(wanted) and all(fnmatch.fnmatchcase(p, w) for p, w in zip(parts, wanted))


def _listing(root: str) -> tuple[object, str, list]:
    """(filesystem, the listed base, every Parquet file's (FileInfo, split or None)) under `root`."""
    import pyarrow.fs as pafs

    filesystem, path = _filesystem(root)
    pattern, base = (path, path) if _is_glob(path) else (None, path)
    while _is_glob(base):
        base = posixpath.dirname(base)
    try:
        infos = filesystem.get_file_info(pafs.FileSelector(base, recursive=True))
    except (FileNotFoundError, OSError) as error:
        raise DatasetMissing(f"dataset 'parquet': cannot list {root} ({error}). {LAYOUT_HELP}") from error
    files = [
        (info, split_of(posixpath.relpath(info.path, base)))
        for info in infos
        if info.type == pafs.FileType.File and (pattern is None or _matches(info.path, pattern))
    ]
    return filesystem, base, files


def eval_split(root: str, wanted: str | None) -> str | None:
    """The evaluation split under `root` (see `trainer.images.choose_eval_split`)."""
    present = {split for _, split in _listing(root)[2]}
    return choose_eval_split(present, wanted, root)


def find_files(root: str, split: str) -> tuple[object, str, list]:
    """(filesystem, the listed base, the split's FileInfos sorted by path) under `root`;
    DatasetMissing, naming where and what was looked for, when none matches."""
    filesystem, base, listed = _listing(root)
    files = sorted((info for info, found in listed if found == split), key=lambda info: info.path)
    if not files:
        raise DatasetMissing(
            f"dataset 'parquet': no {split} split under {root} (looked for {split}.parquet, "
            f"{split}-*.parquet, {split}_*.parquet and {split}/*.parquet). {LAYOUT_HELP}"
        )
    return filesystem, base, files


def _column_kinds(schema, path: str) -> tuple[str, str | None]:
    """The two columns' types as strings (the label's None when there is none: an
    unlabelled split); ParquetDataError when the image is missing or one is unusable."""
    import pyarrow as pa

    names = schema.names
    if IMAGE not in names:
        raise ParquetDataError(f"{path} has no column {IMAGE!r} (columns: {names}). {LAYOUT_HELP}")
    image = schema.field(IMAGE).type
    label = schema.field(LABEL).type if LABEL in names else None
    encoded = (
        pa.types.is_binary(image)
        or pa.types.is_large_binary(image)
        or (pa.types.is_struct(image) and image.get_field_index("bytes") >= 0)
    )
    if not encoded:
        raise ParquetDataError(
            f"{path}: column 'image' is {image}; it must hold encoded images (binary, or a "
            "struct with a 'bytes' field as Hugging Face writes it)"
        )
    if label is not None and not pa.types.is_integer(label):
        raise ParquetDataError(f"{path}: column 'label' is {label}; it must be an integer class index")
    return str(image), None if label is None else str(label)


def _column_paths(metadata) -> dict[str, int]:
    """Parquet column-chunk index by dotted path ('label', 'image.bytes'): a struct
    column is several chunks, so an Arrow field's position is not its chunk's."""
    return {metadata.schema.column(i).path: i for i in range(metadata.num_columns)}


class ParquetSplit:
    """One split of a Parquet dataset, indexed from its files' footers."""

    def __init__(self, root: str, split: str, subset: int = 0, bad: BadImages | None = None):
        import pyarrow.parquet as pq

        self.root, self.split, self.bad = root, split, bad or BadImages()
        self.filesystem, base, listed = find_files(root, split)
        files, kinds, label_max = [], None, -1
        for info in listed:
            path = info.path
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
                raise ParquetDataError(
                    f"{path} has image/label types {found[0]} / {found[1]}, but {first} has "
                    f"{kinds[0]} / {kinds[1]}: the files of a split must share one schema"
                )
            label_max = _check_statistics(metadata, path, label_max)
            files.append(
                SplitFile(
                    path,
                    posixpath.relpath(path, base),
                    info.size,
                    metadata.num_rows,
                    tuple(metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)),
                )
            )
        self.files = files
        self.labelled = kinds[1] is not None
        self.total_rows = sum(f.rows for f in files)
        if subset < 0:
            raise ValueError(f"data.subset must be >= 0, got {subset}")
        self.rows = min(subset, self.total_rows) if subset else self.total_rows
        # Row group r is (file, group within it); group_start[r] its first row over the split.
        self.groups = [(i, g) for i, f in enumerate(files) for g in range(len(f.group_rows))]
        sizes = [files[i].group_rows[g] for i, g in self.groups]
        self.group_start = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self._label_max = label_max  # None: some row group had no statistics
        self._open: dict[int, object] = {}

    def __len__(self):
        return self.rows

    # -- the index -----------------------------------------------------------------

    def _first_kept(self, row: int) -> int:
        """The first subset position whose row is at or after global row `row`."""
        return row if self.rows == self.total_rows else -(-row * self.rows // self.total_rows)

    def kept(self) -> np.ndarray:
        """How many kept rows each row group holds (all of them without a subset)."""
        return np.diff([self._first_kept(int(r)) for r in self.group_start]).astype(np.int64)

    def pieces(self) -> list[Piece]:
        """Every row group whole, in index order."""
        return [Piece(g, 0, int(n)) for g, n in enumerate(self.kept())]

    def rows_of(self, piece: Piece) -> tuple[np.ndarray, np.ndarray]:
        """(offsets within the row group, global indices) of a piece's rows, in its order."""
        start = int(self.group_start[piece.group])
        first, last = self._first_kept(start), self._first_kept(int(self.group_start[piece.group + 1]))
        indices = np.arange(first, last, dtype=np.int64)
        if piece.seed is not None:
            indices = indices[np.random.default_rng(piece.seed).permutation(len(indices))]
        indices = indices[piece.lo : piece.hi]
        rows = indices if self.rows == self.total_rows else indices * self.total_rows // self.rows
        return rows - start, indices

    def where(self, index: int) -> str:
        """'<file>, row group g, row r' of a global index (for error messages)."""
        row = index if self.rows == self.total_rows else index * self.total_rows // self.rows
        group = int(np.searchsorted(self.group_start, row, side="right") - 1)
        file, g = self.groups[group]
        return f"{self.files[file].path}, row group {g}, row {row - int(self.group_start[group])}"

    def fingerprint(self) -> dict:
        """What identifies the split: its files (paths below the listed root), their sizes
        and row counts, and the subset, hashed; where it was read from, for messages.
        A checkpoint stores it; resume compares the hash."""
        files = [[f.relative, f.size, f.rows] for f in self.files]
        digest = hashlib.sha256(repr((files, self.rows)).encode()).hexdigest()[:16]
        return {"sha256": digest, "root": self.root, "files": len(files), "rows": self.rows}

    @property
    def num_classes(self) -> int:
        """Largest label + 1: from the footers' statistics, else from the label column; 0
        for an unlabelled split."""
        if not self.labelled:
            return 0
        if self._label_max is None:
            self._label_max = max(int(self.read(i, g, [LABEL])[LABEL].max(initial=-1)) for i, g in self.groups)
        return self._label_max + 1

    # -- reading -------------------------------------------------------------------

    def read(self, file: int, group: int, columns: list[str], offsets: np.ndarray | None = None) -> dict:
        """One row group's `columns` (the rows at `offsets`, in that order, when given):
        ``label`` an int64 array, ``image`` a list of encoded bytes. Errors name the file
        and the row group."""
        import pyarrow.parquet as pq

        path = self.files[file].path
        read = [c for c in columns if c != LABEL or self.labelled]
        try:
            reader = self._open.get(file)
            if reader is None:
                reader = pq.ParquetFile(self.filesystem.open_input_file(path))
                self._open = {file: reader}  # one file open at a time: pieces come mostly in file order
            table = reader.read_row_group(group, columns=read)
            if offsets is not None:
                table = table.take(offsets)
        except Exception as error:  # noqa: BLE001 -- whatever pyarrow or the filesystem raised
            self.close()
            raise ParquetDataError(
                f"{path}: cannot read row group {group} ({type(error).__name__}: {error})"
            ) from error
        out = {}
        if LABEL in columns and not self.labelled:
            out[LABEL] = np.full(table.num_rows, NO_LABEL, dtype=np.int64)
        elif LABEL in columns:
            labels = table.column(LABEL)
            if labels.null_count:
                raise ParquetDataError(f"{path}: row group {group} has {labels.null_count} null label(s)")
            out[LABEL] = labels.to_numpy().astype(np.int64, copy=False)
        if IMAGE in columns:
            images = image_bytes(table.column(IMAGE))
            if images.null_count:
                raise ParquetDataError(
                    f"{path}: row group {group} has {images.null_count} image(s) without bytes "
                    "(images stored by path are not read: embed their bytes)"
                )
            out[IMAGE] = images.to_pylist()
        return out

    def read_piece(self, piece: Piece, columns=(IMAGE, LABEL)) -> dict:
        """A piece's `columns`, plus ``index``: its rows' global indices."""
        offsets, indices = self.rows_of(piece)
        file, g = self.groups[piece.group]
        return self.read(file, g, list(columns), offsets) | {INDEX: indices}

    def labels_at(self, indices: np.ndarray) -> np.ndarray:
        """Labels of global indices, reading only the label column of the row groups
        they fall in (memory: the indices asked for and one row group's labels)."""
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty(indices.size, dtype=np.int64)
        for (file, g), at, offsets in self._by_row_group(indices.reshape(-1)):
            out[at] = self.read(file, g, [LABEL])[LABEL][offsets]
        return out.reshape(indices.shape)

    def images_at(self, indices: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 images (n, 3, size, size), labels (n,)) of global indices, in their
        order: only their row groups are read and only their rows decoded (memory: the
        rows asked for and one row group's encoded images). An image that does not
        decode raises BadImage naming its file, row group and row."""
        flat = np.asarray(indices, dtype=np.int64).reshape(-1)
        images = np.empty((len(flat), 3, size, size), dtype=np.uint8)
        labels = np.empty(len(flat), dtype=np.int64)
        for (file, g), at, offsets in self._by_row_group(flat):
            values = self.read(file, g, [IMAGE, LABEL], offsets)
            images[at] = decode(values[IMAGE], size, lambda i, at=at: self.where(int(flat[at[i]])))[0]
            labels[at] = values[LABEL]
        return images, labels

    def _by_row_group(self, flat: np.ndarray):
        """Global indices grouped by the row group they are in: ((file, group within it),
        their positions in `flat`, their offsets within the row group), a group at a time."""
        rows = flat if self.rows == self.total_rows else flat * self.total_rows // self.rows
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        group_of = np.searchsorted(self.group_start, sorted_rows, side="right") - 1
        bounds = np.flatnonzero(np.diff(group_of)) + 1
        for run in np.split(np.arange(len(sorted_rows)), bounds):
            if len(run):
                group = int(group_of[run[0]])
                yield self.groups[group], order[run], sorted_rows[run] - self.group_start[group]

    def close(self) -> None:
        self._open = {}

    def __getstate__(self):  # loader processes get the index, not an open file
        state = self.__dict__.copy()
        state["_open"] = {}
        return state


def image_bytes(column):
    """The encoded images of an `image` column, as one Arrow array: binary as it is, or
    the ``bytes`` of Hugging Face's ``{bytes, path}`` struct."""
    images = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    if hasattr(images.type, "get_field_index") and images.type.get_field_index("bytes") >= 0:
        images = images.field("bytes")
    return images


def _check_statistics(metadata, path: str, label_max: int | None) -> int | None:
    """Refuse nulls that the footer's statistics show (labels, image bytes); return the
    largest label so far, or None once a row group has no statistics for it."""
    columns = _column_paths(metadata)
    label = columns.get(LABEL)
    image = columns.get(f"{IMAGE}.bytes", columns.get(IMAGE))
    for g in range(metadata.num_row_groups):
        group = metadata.row_group(g)
        for name, column in (("label", label), ("image", image)):
            stats = group.column(column).statistics if column is not None else None
            if stats is not None and stats.has_null_count and stats.null_count:
                raise ParquetDataError(
                    f"{path}: row group {g} has {stats.null_count} null {name} value(s)"
                    + (" (images stored by path are not read: embed their bytes)" if name == "image" else "")
                )
        if label is None:
            continue
        stats = group.column(label).statistics
        if label_max is not None and stats is not None and stats.has_min_max:
            label_max = max(label_max, int(stats.max))
        else:
            label_max = None
    return label_max


def decode(encoded: list[bytes], size: int, where=None, bad: BadImages | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 (m, 3, size, size), which of the n encoded images they are (bool (n,))):
    each by `image_to_chw`; one that does not decode goes to `bad` (default: raise
    BadImage) as `where(i)`."""
    bad = bad or BadImages()
    out = np.empty((len(encoded), 3, size, size), dtype=np.uint8)
    kept = np.ones(len(encoded), dtype=bool)
    for i, data in enumerate(encoded):
        try:
            out[i] = image_to_chw(Image.open(io.BytesIO(data)), size)
        except DECODE_ERRORS as error:
            bad.met(where(i) if where else f"image {i}", error)
            kept[i] = False
    return (out if kept.all() else out[kept]), kept


def source_size(data: ParquetSplit) -> tuple[int, int] | None:
    """(width, height) of the split's first image, from its header; None when it has none."""
    encoded = data.read_piece(Piece(0, 0, 1), (IMAGE,))[IMAGE] if len(data) else []
    data.close()
    try:
        with Image.open(io.BytesIO(encoded[0])) as image:
            return image.size
    except (IndexError, *DECODE_ERRORS):
        return None


def load_split(root: str, split: str, size: int, subset: int = 0, bad: BadImages | None = None) -> InMemoryImages:
    """The split (or its evenly spaced `subset`, as streaming takes it) decoded into
    memory once: what ``data.stream=false`` and `instdisc eval` hold, N images (fewer by
    those `bad` skips: the rows after one then move up)."""
    data = ParquetSplit(root, split, subset, bad)
    images = np.empty((len(data), 3, size, size), dtype=np.uint8)
    labels = np.empty(len(data), dtype=np.int64)
    kept = np.ones(len(data), dtype=bool)
    for piece in data.pieces():
        values = data.read_piece(piece)
        at = values[INDEX]
        decoded, ok = decode(values[IMAGE], size, lambda i, at=at: data.where(int(at[i])), data.bad)
        images[at[ok]] = decoded
        labels[at] = values[LABEL]
        kept[at[~ok]] = False
    if not kept.all():
        images, labels = images[kept], labels[kept]
    return InMemoryImages(torch.from_numpy(images), torch.from_numpy(labels), data.num_classes, source_size(data))
