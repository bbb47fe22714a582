"""The ImageFolder kind: a folder of images per split, with one sub-folder per class
or the images directly in it (unlabelled).

- **Splits.** ``data.root/train/`` and the evaluation split ``data.root/<test_split>/``
  (the first of test, val, valid, validation present, or ``data.test_split``). A root
  without ``train/`` is itself the train split, and there is no evaluation split.
- **Classes by name.** The class folders of the train split are numbered in sorted
  order (of the evaluation split's when the train split is unlabelled), and every split
  takes that numbering: a split that lacks a class keeps the others' indices. A class
  folder found only in the evaluation split is refused: nothing was trained to vote
  for it.
"""

from __future__ import annotations

from pathlib import Path

from trainer.config import EVAL_SPLITS
from trainer.images import NO_LABEL, BadImages, DataError, DatasetMissing, DecodedImages, choose_eval_split

# The suffixes torchvision's ImageFolder reads.
EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
LAYOUT_HELP = (
    "data.root must hold train/ (and test/, val/, valid/ or validation/ to evaluate on), each "
    "with one sub-folder of images per class, or the images directly in it (unlabelled); "
    "or be itself that one folder"
)


class UnknownClass(DataError):
    """A class folder of the evaluation split that the train split has not."""


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in EXTENSIONS


def _listing(folder: Path) -> tuple[dict[str, list[Path]], list[Path]]:
    """(the images of each class sub-folder, at any depth below it; the images directly
    in `folder`), sorted. Hidden folders (``.ipynb_checkpoints``) are not classes."""
    classes = {
        d.name: sorted(p for p in d.rglob("*") if _is_image(p))
        for d in sorted(folder.iterdir())
        if d.is_dir() and not d.name.startswith(".")
    }
    direct = sorted(p for p in folder.iterdir() if _is_image(p))
    if classes and direct:
        raise DataError(
            f"{folder} holds both images ({direct[0].name}, ...) and class folders ({', '.join(classes)}): "
            "put every image in a class folder, or none (unlabelled)"
        )
    if not direct and not any(classes.values()):
        raise DatasetMissing(f"dataset 'imagefolder': no images in {folder}. {LAYOUT_HELP}")
    return classes, direct


def split_folders(root: Path, test_split: str | None) -> tuple[Path, str | None]:
    """(the train split's folder, the evaluation split's name or None)."""
    if not root.is_dir():
        raise DatasetMissing(f"dataset 'imagefolder': no folder {root}. {LAYOUT_HELP}")
    present = [s for s in EVAL_SPLITS if (root / s).is_dir()]
    if not (root / "train").is_dir():
        if present:
            raise DatasetMissing(f"dataset 'imagefolder': {root} has {present[0]}/ but no train/. {LAYOUT_HELP}")
        return root, choose_eval_split(present, test_split, str(root))
    return root / "train", choose_eval_split(present, test_split, str(root))


def load_imagefolder(
    root: Path, size: int, test_split: str | None = None, bad: BadImages | None = None
) -> tuple[DecodedImages, DecodedImages | None, str | None]:
    """(train split, evaluation split or None, its name), labelled by one class map."""
    bad = bad or BadImages()
    train_folder, split = split_folders(root, test_split)
    train = _listing(train_folder)
    test = _listing(root / split) if split else None
    named = train[0] or (test[0] if test else {})
    index = {name: i for i, name in enumerate(named)}  # _listing sorted them
    if test and train[0]:
        unknown = [name for name in test[0] if name not in index]
        if unknown:
            raise UnknownClass(
                f"class folder {unknown[0]!r} in {root / split} is not in {train_folder} (its classes: "
                f"{', '.join(index)}): kNN and the linear probe score against the training classes"
            )

    def dataset(listing) -> DecodedImages:
        classes, direct = listing
        paths = [str(p) for p in direct] + [str(p) for name in classes for p in classes[name]]
        labels = [NO_LABEL] * len(direct) + [index[name] for name in classes for _ in classes[name]]
        return DecodedImages(paths, labels, len(index) if classes else 0, size, bad)

    return dataset(train), dataset(test) if test else None, split
