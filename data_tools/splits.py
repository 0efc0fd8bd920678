"""Groups and seeded, stratified (group-disjoint) train/val/test splits.

Groups (``--group-by``) are computed from a sample's *source path relative to SOURCE* (for CSV and NIH
lists: the image path exactly as written in the file), with ``/`` separators:

- an integer ``N`` takes the folder at depth ``N`` (``0`` = the first folder under SOURCE),
  e.g. ``0`` for ``<patient>/<class>/<image>``;
- anything else is a regular expression searched in that path; the group is its first capture group
  (the whole match if it has none), e.g. ``'^(\\d+)_'`` for NIH ``<patient>_<visit>.png`` names.

Splitting: `ilm_dist.data.stratify` allocates every group (every sample when there are no groups) to
a split, stratified over the classes (positives per label for multi-label data); groups stay disjoint by
construction.  A split with fraction 0 is left out.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from data_tools.errors import PackError
from data_tools.records import SPLITS, Record
from data_tools.sources import Source, split_name
from ilm_dist.data.stratify import allocate, count_vectors

DEFAULT_FRACTIONS = "0.8,0.1,0.1"
TRAINVAL = "trainval"  # a --split-list split that the packer divides into train and val
# train:val of the trainval part: 70:10, the train:val ratio of the usual 70/10/20 NIH ChestX-ray14 split
# (Wang et al. 2017), whose official test list holds about a fifth of the images
TRAINVAL_FRACTIONS = "0.875,0.125,0"


def parse_fractions(text: str) -> dict[str, float]:
    """``'0.8,0.1,0.1'`` → ``{'train': 0.8, 'val': 0.1, 'test': 0.1}`` (zero fractions dropped)."""
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise PackError(f"--split-fractions {text!r}: expected three numbers like 0.8,0.1,0.1") from None
    if len(values) != len(SPLITS) or min(values) < 0 or abs(sum(values) - 1) > 1e-6 or values[0] == 0:
        raise PackError(
            f"--split-fractions {text!r}: expected three non-negative fractions for train,val,test "
            "that sum to 1, with train > 0"
        )
    return {name: value for name, value in zip(SPLITS, values, strict=True) if value > 0}


def group_function(spec: str) -> Callable[[str], str]:
    """Build the ``--group-by`` function (see module docstring); it raises ValueError for paths it cannot
    group, and PackError for an invalid ``spec``."""
    if spec.isdigit():
        depth = int(spec)

        def by_depth(path: str) -> str:
            folders = path.split("/")[:-1]
            if depth >= len(folders):
                raise ValueError(
                    f"--group-by {depth} needs a folder at depth {depth}, the path has {folders}"
                )
            return folders[depth]

        return by_depth
    try:
        pattern = re.compile(spec)
    except re.error as err:
        raise PackError(
            f"--group-by {spec!r}: not an integer folder depth nor a valid regex ({err})"
        ) from None

    def by_regex(path: str) -> str:
        match = pattern.search(path)
        if match is None:
            raise ValueError(f"--group-by regex {spec!r} does not match")
        return match.group(1) if pattern.groups else match.group(0)

    return by_regex


def assign_groups(records: list[Record], group_of: Callable[[str], str] | None) -> list[Record]:
    """Set every record's group from its source path (unchanged without ``group_of``)."""
    if group_of is None:
        return records
    grouped = []
    for record in records:
        try:
            grouped.append(replace(record, group=group_of(record.source)))
        except ValueError as err:
            raise PackError(f"{record.ref.describe()}: relative path {record.source!r}: {err}") from None
    return grouped


def stratified_split(
    records: Sequence[Record], fractions: dict[str, float], num_classes: int, seed: int
) -> dict[str, list[Record]]:
    """Split ``records`` (by group when they have groups) with `ilm_dist.data.stratify`."""
    records = sorted(records, key=lambda record: record.source)
    members = _group_members(records)
    vectors = count_vectors([[records[i].labels for i in indices] for indices in members], num_classes)
    units = allocate(vectors, fractions, seed)
    assigned = {name: [records[i] for row in rows for i in members[row]] for name, rows in units.items()}
    for name, split in assigned.items():
        if not split:
            unit = "groups" if records[0].group is not None else "samples"
            raise PackError(
                f"split {name!r} would be empty: only {len(members)} {unit} for fractions "
                f"{fractions}; add data or change --split-fractions"
            )
    return assigned


def _group_members(records: Sequence[Record]) -> list[list[int]]:
    """Record indices per group, in first-seen order; ungrouped records are groups of one."""
    by_group: dict[object, list[int]] = {}
    for i, record in enumerate(records):
        by_group.setdefault(record.group if record.group is not None else ("__single__", i), []).append(i)
    return list(by_group.values())


def shuffled(records: Sequence[Record], seed: int) -> list[Record]:
    """Seeded, input-order independent shuffle (records are first sorted by source path)."""
    ordered = sorted(records, key=lambda record: record.source)
    permutation = np.random.default_rng([seed, 1]).permutation(len(ordered))
    return [ordered[i] for i in permutation]


def parse_split_list(text: str) -> tuple[str, Path]:
    """``test=FILE`` -> ("test", FILE); the split is train, val (valid), test or trainval."""
    head, sep, tail = text.partition("=")
    split = TRAINVAL if head.strip().lower() == TRAINVAL else split_name(head)
    if not sep or split is None or not tail:
        raise PackError(
            f"--split-list {text!r}: expected SPLIT=FILE with SPLIT one of train, val, test, trainval"
        )
    return split, Path(tail)


def read_split_list(path: Path) -> list[str]:
    """Image names, the first field of each non-empty line (NIH's ``train_val_list.txt`` / ``test_list.txt``)."""
    try:
        return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise PackError(f"{path}: cannot read split list ({err})") from None


def apply_split_lists(records: list[Record], lists: list[tuple[str, Path]]) -> list[Record]:
    """Set every record's split from the lists, which name records by their source name (for label files:
    the image name as the file writes it); every record must be listed exactly once."""
    split_of: dict[str, tuple[str, Path]] = {}
    for split, path in lists:
        for name in read_split_list(path):
            if name in split_of and split_of[name] != (split, path):
                raise PackError(
                    f"{path}: {name!r} is also listed in {split_of[name][1]} ({split_of[name][0]})"
                )
            split_of[name] = (split, path)
    unlisted = [record.source for record in records if record.source not in split_of]
    if unlisted:
        raise PackError(
            f"{len(unlisted)} image(s) are in no --split-list, e.g. {unlisted[:3]}; list every image "
            f"of the source in one of {', '.join(str(path) for _, path in lists)}"
        )
    known = {record.source for record in records}
    extra = [name for name in split_of if name not in known]
    if extra:
        print(
            f"note: {len(extra)} name(s) of the split lists are not in the source, e.g. {extra[:3]}",
            file=sys.stderr,
        )
    return [replace(record, split=split_of[record.source][0]) for record in records]


def make_splits(
    records: list[Record], fractions: dict[str, float] | None, num_classes: int, seed: int
) -> tuple[dict[str, list[Record]], str]:
    """Each split's records in seeded shuffled order, and the manifest's ``split_method``.

    ``fractions`` None keeps the source's splits; otherwise the records are split by ``fractions``, except
    that when some come with a split (from ``--split-list``) only the ``trainval`` ones are, and the rest
    stay in their split (method ``lists+stratified[_group]``)."""
    grouped = records[0].group is not None
    if fractions is None:
        splits = {name: [r for r in records if r.split == name] for name in SPLITS}
        _warn_shared(_shared_groups(splits), "source splits")
        method = "source"
    elif any(record.split == TRAINVAL for record in records):
        drawn = stratified_split([r for r in records if r.split == TRAINVAL], fractions, num_classes, seed)
        splits = {name: [r for r in records if r.split == name] + drawn.get(name, []) for name in SPLITS}
        shared = _shared_groups(splits)
        _warn_shared(shared, "splits (the --split-list files share them)")
        method = "lists+stratified_group" if grouped and not shared else "lists+stratified"
    else:
        splits = stratified_split(records, fractions, num_classes, seed)
        method = "stratified_group" if grouped else "stratified"
    return {name: shuffled(split, seed) for name, split in splits.items() if split}, method


def _shared_groups(splits: dict[str, list[Record]]) -> set[str]:
    seen: dict[str, str] = {}
    shared = set()
    for name, records in splits.items():
        for group in {record.group for record in records if record.group is not None}:
            if seen.setdefault(group, name) != name:
                shared.add(group)
    return shared


def _warn_shared(shared: set[str], where: str) -> None:
    if shared:
        print(
            f"warning: {len(shared)} group(s) appear in several {where}, e.g. {sorted(shared)[:3]}",
            file=sys.stderr,
        )


def choose_fractions(
    args: argparse.Namespace, records: list[Record], source: Source
) -> dict[str, float] | None:
    """The packer's split fractions, or None to keep the source's (or the split lists') splits."""
    listed = any(record.split is not None for record in records)
    if args.split_list and (source.has_splits or args.resplit):
        reason = "has its own splits" if source.has_splits else "is resplit (--resplit)"
        raise PackError(f"{source.path}: --split-list cannot be used when the source {reason}")
    if any(record.split == TRAINVAL for record in records):
        fractions = parse_fractions(args.split_fractions or TRAINVAL_FRACTIONS)
        if "test" in fractions:
            raise PackError(
                f"--split-fractions {args.split_fractions}: the test split comes from --split-list, so the "
                f"trainval images are divided into train and val only; give a test fraction of 0 (e.g. "
                f"{TRAINVAL_FRACTIONS})"
            )
        return fractions
    if listed and not args.resplit:
        if args.split_fractions:
            what = "--split-list gives every split" if args.split_list else "the source has its own splits"
            raise PackError(f"{source.path}: {what}; add --resplit to use --split-fractions")
        return None
    return parse_fractions(args.split_fractions or DEFAULT_FRACTIONS)
