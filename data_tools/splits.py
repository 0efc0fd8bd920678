"""Groups and seeded, stratified (group-disjoint) train/val/test splits.

Groups (``--group-by``) are computed from a sample's *source path relative to SOURCE* (for CSV and NIH
lists: the image path exactly as written in the file), with ``/`` separators:

- an integer ``N`` takes the folder at depth ``N`` (``0`` = the first folder under SOURCE),
  e.g. ``0`` for ``<patient>/<class>/<image>``;
- anything else is a regular expression searched in that path; the group is its first capture group
  (the whole match if it has none), e.g. ``'^(\\d+)_'`` for NIH ``<patient>_<visit>.png`` names.

Splitting: every group (every sample when there are no groups) gets a count vector
``[samples, samples (or positives) of class 0, class 1, ...]``.  Groups are visited largest first
(ties in seeded random order) and each goes to the split where it most reduces the squared error
``sum_split,dim ((count - fraction * total) / total)^2``, with each dimension normalised by its total so
rare classes weigh as much as common ones.  Single samples therefore get near-exact per-class stratification
(within one sample per class and split); for multi-label data it balances every label's positives and the
sample count at once; groups stay disjoint by construction.  A split with fraction 0 is left out.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from data_tools.errors import PackError
from data_tools.records import SPLITS, Record

DEFAULT_FRACTIONS = "0.8,0.1,0.1"


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
    """Split ``records`` (by group when they have groups) as described in the module docstring."""
    records = sorted(records, key=lambda record: record.source)
    members = _group_members(records)
    vectors = np.zeros((len(members), 1 + num_classes))
    for row, indices in enumerate(members):
        vectors[row, 0] = len(indices)
        for i in indices:
            vectors[row, 1 + np.asarray(records[i].labels, dtype=int)] += 1
    names = list(fractions)
    totals = np.maximum(vectors.sum(axis=0), 1)
    targets = np.asarray([fractions[name] for name in names])[:, None] * vectors.sum(axis=0)
    weights = 1 / totals**2
    current = np.zeros_like(targets)
    rng = np.random.default_rng(seed)
    order = sorted(rng.permutation(len(members)), key=lambda row: -vectors[row, 0])
    assigned: dict[str, list[Record]] = {name: [] for name in names}
    for row in order:
        vector = vectors[row]
        cost = (weights * vector * (2 * (current - targets) + vector)).sum(axis=1)
        best = int(np.argmin(cost))
        current[best] += vector
        assigned[names[best]].extend(records[i] for i in members[row])
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
