"""The on-disk contract between `data_tools.pack` (writer) and the data backends (readers).

A packed dataset is a directory::

    OUT_DIR/
      manifest.json
      train-000000.tar   train-000000.idx   (DALI index, `wds2idx` format)
      val-000000.tar     ...
      test-000000.tar    ...

Each tar holds WebDataset samples; one sample is the files sharing a ``__key__`` prefix:

- ``<key>.jpg``  the image, re-encoded as baseline JPEG (grayscale sources stay 1-channel);
- ``<key>.lbl``  the label vector as raw little-endian int32 bytes: one value (the class
  index) for ``binary``/``multiclass``/``ordinal`` tasks, a multi-hot vector of ``len(class_names)``
  for ``multilabel`` tasks.  Raw bytes so DALI can read it with ``dtypes=INT32``;
- ``<key>.json`` metadata for people and tools: ``{"source": original path, "group": group id
  or null, "labels": [class names]}``.

``manifest.json`` (``format == "ilm_dist.shards/v1"``)::

    {"format": "ilm_dist.shards/v1",
     "task": "binary" | "multiclass" | "ordinal" | "multilabel",
     "class_names": [...],
     "image_mode": "L" | "RGB",
     "split_method": "source" | "stratified" | "stratified_group" | "lists+stratified[_group]",
     "splits": {"train": {"num_samples": int,
                          "class_counts": {class_name: int},
                          "num_groups": int | null,
                          "shards": [{"name": "train-000000.tar", "index": "train-000000.idx",
                                      "num_samples": int, "sha256": hex, "bytes": int}]},
                "val": {...}, "test": {...}},
     "skipped": {"count": int, "files": [{"path": str, "reason": str}]},
     "source": {"kind": "folder" | "csv" | "nih_list" | "npz" | "synthetic", "path": str | null, ...},
     "args": {...}, "created": iso8601}

Tasks: ``binary`` (two classes), ``multiclass`` (three or more nominal classes), ``ordinal`` (three or
more classes listed in their order, e.g. retinopathy grades: only then is a class-index distance such as
quadratic-weighted kappa meaningful; the packer writes it only from an explicit ``--ordinal --classes``),
``multilabel`` (multi-hot).  A ``multiclass`` manifest written before ``ordinal`` existed is read as
nominal: its class order was alphabetical, so nothing in it says that the classes are ordered.

Fields added by ``data_tools.pack`` (readers may ignore them): ``split_method`` says whether the splits
come from the source or were made by the packer (``stratified_group``: groups, e.g. patients, are
disjoint across splits, which ``data_tools.verify`` checks; ``lists+...``: the test split, and any split
named by a ``--split-list``, came from lists of image names, the ``trainval`` list was divided into train
and val); ``num_groups`` is the number of distinct
groups in a split (null without ``--group-by``); ``bytes`` is the shard's size.  Splits are omitted
when empty; ``class_counts`` lists every class (positives per class for ``multilabel``); keys are
``{split}_{index:08d}``; ``skipped`` paths and ``.json`` sources are relative to ``source.path``.
``source`` also records how labels were read (CSV columns, ``label_sep``, ``group_col``, ...) and, with
``--map-labels``, the ``label_map`` and the ``source_classes`` it mapped from.  ``dicom`` (only when DICOM
files were packed): ``{"policy": str, "files": int, <attribute>: {value:
count}}`` for the attributes the 8-bit conversion used (transfer syntax, photometric interpretation, bits
stored, rescale, VOI source and function; see ``data_tools.dicom``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from ilm_dist.errors import InputError
from ilm_dist.strict import load_json

FORMAT = "ilm_dist.shards/v1"
TASKS = ("binary", "multiclass", "ordinal", "multilabel")


MANIFEST = "manifest.json"


class ManifestError(InputError):
    """A packed dataset directory is missing, incomplete or inconsistent."""


@dataclass(frozen=True)
class ShardInfo:
    tar: Path
    index: Path
    num_samples: int
    sha256: str
    bytes: int | None = None  # the tar's size (written by data_tools.pack; absent in hand-made manifests)


@dataclass(frozen=True)
class SplitInfo:
    name: str
    num_samples: int
    class_counts: dict[str, int]
    shards: tuple[ShardInfo, ...]


@dataclass(frozen=True)
class Manifest:
    root: Path
    task: str
    class_names: tuple[str, ...]
    image_mode: str
    splits: dict[str, SplitInfo]
    raw: dict
    sha256: str  # of manifest.json's bytes: it names every shard with its own sha256, so it names the data

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def label_width(self) -> int:
        """Number of int32 values in each sample's ``.lbl`` record."""
        return self.num_classes if self.task == "multilabel" else 1

    @property
    def file_names(self) -> set[str]:
        """The names of the files this dataset consists of: ``manifest.json`` and every shard and index."""
        shards = [shard for split in self.splits.values() for shard in split.shards]
        return {MANIFEST} | {file.name for shard in shards for file in (shard.tar, shard.index)}

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise ManifestError(
                f"{self.root / 'manifest.json'}: no split {name!r}; it has {sorted(self.splits)}"
            )
        return self.splits[name]


def load_manifest(root: str | Path, check_files: bool = True) -> Manifest:
    """Read and validate ``root/manifest.json``; with ``check_files`` every shard and index must exist."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{path}: not found (is {root} a directory written by data_tools.pack?)")
    data = path.read_bytes()
    try:
        raw = load_json(data.decode())
    except ValueError as err:  # JSONDecodeError, DuplicateKeyError, or UnicodeDecodeError for a binary file
        raise ManifestError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise ManifestError(f"{path}: holds {type(raw).__name__}, expected a JSON object")
    if raw.get("format") != FORMAT:
        raise ManifestError(f"{path}: format is {raw.get('format')!r}, expected {FORMAT!r}")
    for key in ("task", "class_names", "image_mode", "splits"):
        if key not in raw:
            raise ManifestError(f"{path}: missing key {key!r}")
    if raw["task"] not in TASKS:
        raise ManifestError(f"{path}: task is {raw['task']!r}, expected one of {TASKS}")
    splits = {name: _parse_split(root, path, name, entry) for name, entry in raw["splits"].items()}
    _check_files_listed_once(path, splits)
    for split in splits.values():
        _check_class_counts(path, split, raw["task"], raw["class_names"])
    if check_files:
        for split in splits.values():
            for shard in split.shards:
                _check_shard_files(path, split.name, shard)
    sha256 = hashlib.sha256(data).hexdigest()
    return Manifest(root, raw["task"], tuple(raw["class_names"]), raw["image_mode"], splits, raw, sha256)


def plain_file_name(path: Path, split: str, field: str, name: object) -> str:
    """``name`` if it is a plain file name (no folder part, not ``.``/``..``), else a ManifestError: a
    manifest only names files inside its own folder."""
    plain = isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")
    if not plain:
        raise ManifestError(
            f"{path}: split {split!r} has {field} {name!r}; expected a plain file name inside {path.parent}"
        )
    return name


def _parse_split(root: Path, path: Path, name: str, entry: dict) -> SplitInfo:
    try:
        shards = tuple(
            ShardInfo(
                root / plain_file_name(path, name, "shard name", s["name"]),
                root / plain_file_name(path, name, "index name", s["index"]),
                int(s["num_samples"]),
                s["sha256"],
                int(s["bytes"]) if "bytes" in s else None,
            )
            for s in entry["shards"]
        )
        split = SplitInfo(name, int(entry["num_samples"]), dict(entry["class_counts"]), shards)
    except (KeyError, TypeError) as err:
        raise ManifestError(f"{path}: split {name!r} is malformed (missing {err})") from None
    if sum(s.num_samples for s in shards) != split.num_samples:
        raise ManifestError(f"{path}: split {name!r} shard sample counts do not add up to num_samples")
    return split


def _check_files_listed_once(path: Path, splits: dict[str, SplitInfo]) -> None:
    """No shard or index file is listed twice, within a split or across splits (a split would train on another's
    samples, or on the same ones twice)."""
    seen: dict[str, str] = {}
    for split in splits.values():
        for shard in split.shards:
            for file in (shard.tar.name, shard.index.name):
                if file in seen:
                    raise ManifestError(
                        f"{path}: {file} is listed twice (split {seen[file]!r} and split {split.name!r})"
                    )
                seen[file] = split.name


def _check_class_counts(path: Path, split: SplitInfo, task: str, class_names: list[str]) -> None:
    """``class_counts`` names only classes of the manifest and, where given for a single-label task, adds up to
    the split's ``num_samples`` (a multilabel count is at most that)."""
    unknown = sorted(set(split.class_counts) - set(class_names))
    if unknown:
        raise ManifestError(
            f"{path}: split {split.name!r} counts classes {unknown} that class_names does not list"
        )
    total = sum(split.class_counts.values())
    if task == "multilabel":
        over = {k: v for k, v in split.class_counts.items() if v > split.num_samples}
        if over:
            raise ManifestError(
                f"{path}: split {split.name!r} class_counts {over} exceed its {split.num_samples} samples"
            )
    elif split.class_counts and total != split.num_samples:
        raise ManifestError(
            f"{path}: split {split.name!r} class_counts add up to {total}, but num_samples is {split.num_samples}"
        )


def _check_shard_files(path: Path, split: str, shard: ShardInfo) -> None:
    """The shard and its index exist, and the shard has the size the packer recorded (a truncated or replaced
    shard is caught here for the price of a stat)."""
    for file in (shard.tar, shard.index):
        if not file.is_file():
            raise ManifestError(f"{path}: split {split!r} lists {file.name}, which is missing")
    size = shard.tar.stat().st_size
    if shard.bytes is not None and size != shard.bytes:
        raise ManifestError(
            f"{shard.tar}: {size} bytes, manifest.json says {shard.bytes} (truncated or replaced since it was "
            "packed; check with python -m data_tools.verify)"
        )
