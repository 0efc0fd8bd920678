"""Sources whose labels come from a file: CSV/TSV tables and NIH ChestX-ray14 list files.

Image names are resolved against the image root (SOURCE): ``root/name`` when it exists, otherwise the
unique image under ``root`` (searched recursively) with that file name, as in the NIH release where images
are spread over ``images_001/images/`` ... folders.  Unresolvable names become "file not found" bad images.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

from data_tools.errors import PackError
from data_tools.records import FileRef, Record
from data_tools.sources import Source, choose_classes, scan_images, split_name

NIH_CLASSES = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)


@dataclass(frozen=True)
class Entry:
    where: str  # "file:line" for messages
    name: str
    labels: tuple[int, ...]
    split: str | None
    group: str | None = None


class ImageResolver:
    """Map an image name from a label file to a path under ``root`` (see module docstring)."""

    def __init__(self, root: Path):
        if not root.is_dir():
            raise PackError(f"{root}: image root is not a directory")
        self.root = root
        self._by_name: dict[str, list[Path]] | None = None

    def __call__(self, name: str) -> Path:
        direct = self.root / name
        if direct.is_file():
            return direct
        if self._by_name is None:
            self._by_name = {}
            for path in scan_images(self.root):
                self._by_name.setdefault(path.name, []).append(path)
        matches = self._by_name.get(PurePosixPath(name).name, [])
        return matches[0] if len(matches) == 1 else direct


def parse_binary(text: str) -> int:
    """``0``/``1`` (also ``0.0``/``1.0``) → int; ValueError otherwise."""
    value = float(text)
    if value not in (0.0, 1.0):
        raise ValueError(text)
    return int(value)


def _records(entries: list[Entry], root: Path) -> list[Record]:
    if not entries:
        raise PackError(f"{root}: the label file(s) list no images")
    resolve = ImageResolver(root)
    seen: dict[str, str] = {}
    records = []
    for entry in entries:
        if entry.name in seen:
            raise PackError(
                f"{entry.where}: image {entry.name!r} is listed twice (first at {seen[entry.name]})"
            )
        seen[entry.name] = entry.where
        ref = FileRef(resolve(entry.name))
        records.append(Record(ref, entry.name, entry.labels, group=entry.group, split=entry.split))
    return sorted(records, key=lambda record: record.source)


@dataclass(frozen=True)
class CsvLayout:
    """Which columns of a label table mean what."""

    image_col: str
    label_cols: tuple[str, ...]
    split_col: str | None = None
    group_col: str | None = None  # e.g. a patient id: groups for group-disjoint splits
    label_sep: str | None = None  # one label column of SEP-joined class names: multi-label
    empty_label: str | None = None  # with label_sep: the value that means "no positive class"

    def check(self) -> None:
        if self.label_sep is not None and len(self.label_cols) != 1:
            raise PackError("--label-sep needs exactly one --label-cols column (of SEP-joined class names)")
        if self.empty_label is not None and self.label_sep is None:
            raise PackError("--empty-label is only valid with --label-sep")

    @property
    def multilabel(self) -> bool:
        return len(self.label_cols) > 1 or self.label_sep is not None


# NIH ChestX-ray14's Data_Entry_2017.csv as NIH distributes it: ``Image Index, Finding Labels, Follow-up #,
# Patient ID, ...`` with findings such as ``Cardiomegaly|Effusion`` or ``No Finding`` (Wang et al. 2017).
NIH_CSV = CsvLayout(
    "Image Index", ("Finding Labels",), group_col="Patient ID", label_sep="|", empty_label="No Finding"
)


def csv_source(
    table: Path, root: Path, layout: CsvLayout, classes: Sequence[str] | None, classes_as: str = ""
) -> Source:
    """One label column of class names (single-label), several 0/1 columns (multi-label, the column names
    are the class names) or, with ``label_sep``, one column of SEP-joined class names (multi-label);
    ``.tsv``/``.tab`` files are tab-separated, others comma-separated."""
    layout.check()
    if len(layout.label_cols) > 1 and classes:
        raise PackError(
            "--classes cannot be combined with several --label-cols (the column names are the classes)"
        )
    extra = [column for column in (layout.split_col, layout.group_col) if column]
    rows = _read_table(table, [layout.image_col, *layout.label_cols, *extra])
    class_names, labels = _labels(table, rows, layout, classes, classes_as)
    entries = [
        Entry(
            f"{table}:{line}",
            _cell(table, line, row, layout.image_col, "an image path"),
            label,
            _split(table, line, row, layout.split_col) if layout.split_col else None,
            _cell(table, line, row, layout.group_col, "a group id") if layout.group_col else None,
        )
        for (line, row), label in zip(rows, labels, strict=True)
    ]
    info = {"labels_csv": str(table), **asdict(layout)}
    return Source("csv", root, class_names, layout.multilabel, _records(entries, root), info)


def nih_csv_source(table: Path, root: Path) -> Source:
    """``Data_Entry_2017.csv``: multi-label over `NIH_CLASSES` in their usual order, ``No Finding`` = no
    positive, groups = ``Patient ID``."""
    return csv_source(table, root, NIH_CSV, NIH_CLASSES, "among the 14 NIH findings")


def _labels(
    table: Path,
    rows: list[tuple[int, dict[str, str]]],
    layout: CsvLayout,
    classes: Sequence[str] | None,
    classes_as: str,
) -> tuple[tuple[str, ...], list[tuple[int, ...]]]:
    """The class names and every row's labels (class indices; the positives for multi-label)."""
    if len(layout.label_cols) > 1:
        return tuple(layout.label_cols), [
            _multi_hot(table, line, row, layout.label_cols) for line, row in rows
        ]
    column = layout.label_cols[0]
    cells = [(line, _cell(table, line, row, column, "a class name")) for line, row in rows]
    if layout.label_sep is None:
        joined = [(line, value) for line, value in cells if "|" in value]
        if joined:
            raise PackError(
                f"{table}:{joined[0][0]}: column {column!r} is {joined[0][1]!r} ({len(joined)} of {len(cells)} "
                "rows hold '|'-joined names); pass --label-sep '|' for multi-label classes (NIH's "
                "Data_Entry_2017.csv: --nih-csv), or they become classes of their own"
            )
        found = [[value] for _, value in cells]
    else:
        found = [_split_names(table, line, column, value, layout) for line, value in cells]
    where: dict[str, str] = {}
    for (line, _), names in zip(cells, found, strict=True):
        for name in names:
            where.setdefault(name, f"{table}:{line}")
    class_names = choose_classes([name for names in found for name in names], classes, where, classes_as)
    index = {name: i for i, name in enumerate(class_names)}
    return class_names, [tuple(sorted(index[name] for name in names)) for names in found]


def _split_names(table: Path, line: int, column: str, value: str, layout: CsvLayout) -> list[str]:
    names = [part.strip() for part in value.split(layout.label_sep)]
    if value == layout.empty_label:
        return []
    if "" in names or layout.empty_label in names or len(set(names)) < len(names):
        raise PackError(
            f"{table}:{line}: column {column!r} is {value!r}; expected class names joined by "
            f"{layout.label_sep!r}, each once"
            + (f", or {layout.empty_label!r} alone" if layout.empty_label else "")
        )
    return names


def _read_table(table: Path, needed: list[str]) -> list[tuple[int, dict[str, str]]]:
    delimiter = "\t" if table.suffix.lower() in (".tsv", ".tab") else ","
    try:
        with open(table, newline="", encoding="utf-8-sig") as file:
            reader = csv.DictReader(file, delimiter=delimiter)
            header = reader.fieldnames or []
            missing = [column for column in needed if column not in header]
            if missing:
                raise PackError(
                    f"{table}: no column(s) {', '.join(map(repr, missing))}; the header has {header}"
                )
            return [(reader.line_num, row) for row in reader]
    except OSError as err:
        raise PackError(f"{table}: cannot read ({err.strerror})") from None
    except (csv.Error, UnicodeDecodeError) as err:
        kind = "tab" if delimiter == "\t" else "comma"
        raise PackError(f"{table}: not readable as a {kind}-separated table ({err})") from None


def _cell(table: Path, line: int, row: dict[str, str], column: str, expected: str) -> str:
    value = (row.get(column) or "").strip()
    if not value:
        raise PackError(f"{table}:{line}: column {column!r} is empty or missing; expected {expected}")
    return value


def _multi_hot(table: Path, line: int, row: dict[str, str], columns: Sequence[str]) -> tuple[int, ...]:
    positives = []
    for i, column in enumerate(columns):
        value = _cell(table, line, row, column, "0 or 1")
        try:
            if parse_binary(value):
                positives.append(i)
        except ValueError:
            raise PackError(f"{table}:{line}: column {column!r} is {value!r}; expected 0 or 1") from None
    return tuple(positives)


def _split(table: Path, line: int, row: dict[str, str], column: str) -> str:
    value = _cell(table, line, row, column, "train, val/valid or test")
    split = split_name(value)
    if split is None:
        raise PackError(f"{table}:{line}: column {column!r} is {value!r}; expected train, val/valid or test")
    return split


def nih_source(lists: Sequence[tuple[str | None, Path]], root: Path) -> Source:
    """NIH ChestX-ray14 lists: lines ``<image name> <14 labels 0/1>`` in `NIH_CLASSES` order, one list per
    split (``train=FILE``) or unsplit lists (``FILE``)."""
    if len({split is None for split, _ in lists}) > 1:
        raise PackError("--nih-list: give every list a split (train=FILE, val=FILE, ...) or none of them")
    entries = [entry for split, path in lists for entry in _nih_entries(path, split)]
    info = {"lists": {split or "all": str(path) for split, path in lists}}
    return Source("nih_list", root, NIH_CLASSES, True, _records(entries, root), info)


def _nih_entries(path: Path, split: str | None) -> list[Entry]:
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise PackError(f"{path}: cannot read NIH list ({err})") from None
    entries = []
    for number, line in enumerate(lines, 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 1 + len(NIH_CLASSES):
            raise PackError(
                f"{path}:{number}: expected an image name and {len(NIH_CLASSES)} labels (0/1), "
                f"got {len(fields) - 1} label(s)"
            )
        positives = []
        for column, value in enumerate(fields[1:]):
            if value not in ("0", "1"):
                raise PackError(
                    f"{path}:{number}: label {column + 1} ({NIH_CLASSES[column]}) is {value!r}; expected 0 or 1"
                )
            if value == "1":
                positives.append(column)
        entries.append(Entry(f"{path}:{number}", fields[0], tuple(positives), split))
    return entries


def parse_nih_list(text: str) -> tuple[str | None, Path]:
    """``train=FILE`` → ("train", FILE); ``FILE`` → (None, FILE)."""
    head, sep, tail = text.partition("=")
    split = split_name(head) if sep else None
    return (split, Path(tail)) if split else (None, Path(text))
