"""Sources that carry their labels in their layout: image-folder trees and MedMNIST-style ``.npz`` files.

Label-file sources (CSV/TSV, NIH lists) are in `data_tools.labelfiles`.  Every source yields sorted
`Record` s plus the class names; a record's ``split`` is set when the source defines its own splits.
"""

from __future__ import annotations

import argparse
import os
import sys
import zipfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from data_tools import dicom
from data_tools.command import comma_list
from data_tools.errors import PackError
from data_tools.records import SPLITS, ArrayRef, FileRef, Record, natural_key, npz_array

IMAGE_SUFFIXES = (
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".tif",
    ".tiff",
    ".gif",
    ".webp",
    ".ppm",
    ".pgm",
    *dicom.SUFFIXES,
)
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


@dataclass(frozen=True)
class Source:
    kind: str
    path: Path
    class_names: tuple[str, ...]
    multilabel: bool
    records: list[Record]
    info: dict = field(default_factory=dict)

    @property
    def has_splits(self) -> bool:
        return any(record.split is not None for record in self.records)

    def manifest_entry(self) -> dict:
        return {"kind": self.kind, "path": str(self.path), **self.info}


def split_name(value: str) -> str | None:
    """Canonical split for a folder/column value (``valid`` → ``val``), None if it is not one."""
    return SPLIT_ALIASES.get(value.strip().lower())


def walk(root: Path) -> Iterator[tuple[Path, list[str], list[str]]]:
    """``os.walk`` of ``root``, hidden names excluded, into links to folders as well: (folder, sorted
    subfolder names, image file names).  A link that leads back to a folder it is in (a loop) or to nothing
    is an error naming the link."""
    above = {os.fspath(root): (Path(os.path.realpath(root)),)}  # real paths of a folder and those above it
    for folder, dirs, files in os.walk(root, followlinks=True):
        chain = above.pop(folder)
        dirs[:] = sorted(name for name in dirs if not name.startswith("."))
        for name in dirs:
            path = os.path.join(folder, name)
            real = Path(os.path.realpath(path))
            if any(seen.is_relative_to(real) for seen in chain):
                raise PackError(
                    f"{path}: leads to {real}, a folder that contains it (a loop); remove the link"
                )
            above[path] = (*chain, real)
        visible = [name for name in files if not name.startswith(".")]
        images = [name for name in visible if name.lower().endswith(IMAGE_SUFFIXES)]
        for name in sorted(set(visible) - set(images)):
            path = os.path.join(folder, name)
            if os.path.islink(path) and not os.path.exists(path):
                raise PackError(f"{path}: is a link to {os.readlink(path)}, which does not exist")
        yield Path(folder), dirs, images


def scan_images(root: Path) -> list[Path]:
    """Image files under ``root`` (see `walk`), sorted."""
    return sorted(folder / name for folder, _, images in walk(root) for name in images)


def choose_classes(
    found: Sequence[str], given: Sequence[str] | None, where: dict[str, str], given_as: str = ""
) -> tuple[str, ...]:
    """``given`` (checked to cover ``found``) or ``found`` in natural order; ``where`` names an example
    location per class for the error message, ``given_as`` what ``given`` is (default ``--classes ...``)."""
    if not given:
        return tuple(sorted(set(found), key=natural_key))
    unknown = sorted(set(found) - set(given), key=natural_key)
    if unknown:
        examples = "; ".join(f"{name!r} at {where[name]}" for name in unknown[:5])
        raise PackError(f"found class(es) not {given_as or 'in --classes ' + ','.join(given)}: {examples}")
    return tuple(given)


def folder_source(root: Path, classes: Sequence[str] | None, allow_empty_folders: bool = False) -> Source:
    """``[split/][group folders/]class/image`` trees; split folders are used when *all* top-level folders
    are split names (train, val/valid/validation, test).  Every image must be at the same depth (a file one
    folder deeper would otherwise be a class of its own), and a folder without images is an error unless
    ``allow_empty_folders`` (its class would silently vanish)."""
    if not root.is_dir():
        raise PackError(f"{root}: not a directory (expected an image folder tree or an .npz file)")
    files = scan_images(root)
    if not files:
        raise PackError(f"{root}: no images found (looked for {', '.join(IMAGE_SUFFIXES)} files)")
    rels = [file.relative_to(root).as_posix() for file in files]
    has_splits = _has_split_folders(root, rels)
    layout = (
        "<split>/[<group folders>/]<class>/<image>" if has_splits else "[<group folders>/]<class>/<image>"
    )
    _check_empty_folders(root, allow_empty_folders)
    _check_depths(root, files, rels, layout)
    entries = []
    for file, rel in zip(files, rels, strict=True):
        parts = rel.split("/")
        if len(parts) < (3 if has_splits else 2):
            raise PackError(f"{file}: not inside a class folder (expected {layout} under {root})")
        entries.append((file, rel, parts[-2], split_name(parts[0]) if has_splits else None))
    where = {name: str(file.parent) for file, _, name, _ in reversed(entries)}
    class_names = choose_classes([name for _, _, name, _ in entries], classes, where)
    index = {name: i for i, name in enumerate(class_names)}
    records = [Record(FileRef(file), rel, (index[name],), split=split) for file, rel, name, split in entries]
    return Source("folder", root, class_names, False, records)


def _check_empty_folders(root: Path, allow: bool) -> None:
    """Leaf folders (no subfolders) without images: an empty class folder, or a class whose images are
    all in formats the packer does not read."""
    empty = [folder for folder, dirs, images in walk(root) if not dirs and not images]
    if empty and not allow:
        raise PackError(
            f"{empty[0]}: folder has no images ({len(empty)} such folder(s)); its class would be missing "
            "from the dataset: remove it, or pass --allow-empty-folders to pack without it"
        )
    if empty:
        print(f"note: ignored {len(empty)} folder(s) without images, e.g. {empty[0]}", file=sys.stderr)


def _check_depths(root: Path, files: list[Path], rels: list[str], layout: str) -> None:
    """Every image at the same folder depth, else the odd ones out would become classes of their own."""
    depths = Counter(rel.count("/") for rel in rels)
    if len(depths) < 2:
        return
    usual, count = depths.most_common(1)[0]
    odd = next(i for i, rel in enumerate(rels) if rel.count("/") != usual)
    example = next(rel for rel in rels if rel.count("/") == usual)
    raise PackError(
        f"{files[odd]}: is {rels[odd].count('/')} folder(s) deep under {root}, but {count} of {len(rels)} "
        f"images are {usual} deep (e.g. {example}); every image must be at {layout} with the same depth"
    )


def _has_split_folders(root: Path, rels: list[str]) -> bool:
    top = {rel.split("/")[0] for rel in rels if "/" in rel}
    splits = {name for name in top if split_name(name)}
    if splits and splits != top:
        raise PackError(
            f"{root}: top-level folders mix split names ({', '.join(sorted(splits))}) with others "
            f"({', '.join(sorted(top - splits, key=natural_key)[:5])}); expected only split folders or none"
        )
    return bool(splits)


def npz_source(path: Path, classes: Sequence[str] | None) -> Source:
    """MedMNIST layout: ``<split>_images`` uint8 [N,H,W] or [N,H,W,3] and ``<split>_labels`` [N], [N,1]
    (class index) or [N,C] (multi-hot) for split in train/val/test."""
    keys = _npz_keys(path)
    splits = [split for split in SPLITS if f"{split}_images" in keys]
    if not splits:
        raise PackError(
            f"{path}: no <split>_images arrays (expected train_images/train_labels, val_..., test_...; "
            f"found {sorted(keys)})"
        )
    labels = {split: _npz_labels(path, split, keys) for split in splits}
    widths = {split: array.shape[1] for split, array in labels.items()}
    if len(set(widths.values())) > 1:
        raise PackError(f"{path}: label arrays have different widths {widths}")
    multilabel = next(iter(widths.values())) > 1
    class_names = _npz_class_names(path, labels, multilabel, classes)
    records = []
    for split in splits:
        _check_npz_images(path, f"{split}_images", len(labels[split]))
        for i, row in enumerate(labels[split]):
            positives = tuple(int(c) for c in np.flatnonzero(row)) if multilabel else (int(row[0]),)
            ref = ArrayRef(path, f"{split}_images", i)
            records.append(Record(ref, f"{split}_images[{i}]", positives, split=split))
    return Source("npz", path, class_names, multilabel, records)


def _npz_keys(path: Path) -> set[str]:
    if not path.is_file():
        raise PackError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise PackError(f"{path}: not an .npz file (expected a zip of arrays as written by numpy.savez)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return set(npz.files)
    except Exception as err:  # zipfile/numpy raise several types for a bad archive
        raise PackError(f"{path}: cannot read as .npz ({type(err).__name__}: {err})") from None


def _npz_labels(path: Path, split: str, keys: set[str]) -> np.ndarray:
    key = f"{split}_labels"
    if key not in keys:
        raise PackError(f"{path}: has {split}_images but no {key}")
    labels = npz_array(path, key)
    if labels.ndim == 1:
        labels = labels[:, None]
    if labels.ndim != 2 or labels.shape[1] < 1 or not np.issubdtype(labels.dtype, np.integer):
        raise PackError(
            f"{path}: {key} is {labels.dtype} {labels.shape}; expected integers [N], [N,1] or [N,C]"
        )
    return labels


def _npz_class_names(
    path: Path, labels: dict[str, np.ndarray], multilabel: bool, classes: Sequence[str] | None
) -> tuple[str, ...]:
    if multilabel:
        width = next(iter(labels.values())).shape[1]
        for split, array in labels.items():
            bad = np.argwhere((array != 0) & (array != 1))
            if len(bad):
                raise PackError(
                    f"{path}: {split}_labels{list(bad[0])} is {array[tuple(bad[0])]}; expected 0 or 1"
                )
        if classes and len(classes) != width:
            raise PackError(f"{path}: labels have {width} columns but --classes names {len(classes)}")
        return tuple(classes) if classes else tuple(str(c) for c in range(width))
    num_classes = len(classes) if classes else 1 + max(int(array.max()) for array in labels.values())
    for split, array in labels.items():
        bad = np.flatnonzero((array[:, 0] < 0) | (array[:, 0] >= num_classes))
        if len(bad):
            raise PackError(
                f"{path}: {split}_labels[{bad[0]}] is {array[bad[0], 0]}; expected a class index 0..{num_classes - 1}"
            )
    return tuple(classes) if classes else tuple(str(c) for c in range(num_classes))


def _check_npz_images(path: Path, key: str, count: int) -> None:
    images = npz_array(path, key)
    shape_ok = images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)
    if not shape_ok or images.dtype != np.uint8 or len(images) != count:
        raise PackError(
            f"{path}: {key} is {images.dtype} {images.shape}; expected uint8 [N,H,W] or [N,H,W,3] "
            f"with N = {count} (the number of labels)"
        )


def parse_label_map(text: str) -> dict[str, str]:
    """``'0=a,1=a,2=b'`` -> ``{'0': 'a', '1': 'a', '2': 'b'}``."""
    mapping = {}
    for part in comma_list(text):
        old, sep, new = (piece.strip() for piece in part.partition("="))
        if not sep or not old or not new or old in mapping:
            raise argparse.ArgumentTypeError(
                f"expected OLD=NEW pairs with each OLD once, got {part!r} in {text!r}"
            )
        mapping[old] = new
    return mapping


def map_classes(source: Source, mapping: dict[str, str], classes: list[str] | None) -> Source:
    """Relabel single-label records through ``mapping`` (source class -> new class), e.g. DR grades 0-4 to
    referable DR; the new classes in ``classes`` order (default: sorted)."""
    if source.multilabel:
        raise PackError(
            f"{source.path}: --map-labels is for single-label classes; this source is multi-label"
        )
    names = [source.class_names[record.labels[0]] for record in source.records]
    where = {}
    for record, name in zip(source.records, names, strict=True):
        where.setdefault(name, record.ref.describe())
    unmapped = [name for name in source.class_names if name in where and name not in mapping]
    if unmapped:
        examples = "; ".join(f"{name!r} (e.g. {where[name]})" for name in unmapped[:5])
        raise PackError(f"--map-labels has no entry for the source class(es) {examples}")
    new_where = {mapping[name]: where[name] for name in reversed(names)}
    new_names = choose_classes([mapping[name] for name in names], classes, new_where)
    index = {name: i for i, name in enumerate(new_names)}
    records = [replace(r, labels=(index[mapping[n]],)) for r, n in zip(source.records, names, strict=True)]
    info = source.info | {"label_map": mapping, "source_classes": list(source.class_names)}
    return replace(source, class_names=new_names, records=records, info=info)
