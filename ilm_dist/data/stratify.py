"""Seeded stratified allocation of samples (or groups of samples) to named parts: the one stratified
sampler behind the packer's train/val/test splits (``data_tools.splits``) and the evaluation's label
subsets (`ilm_dist.eval.subsets`).

Every unit (a group, e.g. a patient, or a single sample) has a count vector ``[samples, samples (or
positives) of class 0, class 1, ...]``. Units are visited largest first (ties in seeded random order) and
each goes to the part where it most reduces the squared error ``sum_part,dim ((count - fraction * total) /
total)^2``, each dimension normalised by its total so rare classes weigh as much as common ones. Single
samples therefore get near-exact per-class stratification (within one sample per class and part); for
multi-label data it balances every label's positives and the sample count at once; groups stay whole.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def count_vectors(unit_labels: Sequence[Sequence[Sequence[int]]], num_classes: int) -> np.ndarray:
    """``[units, 1 + num_classes]``: per unit, its number of samples and its samples (positives) per class;
    ``unit_labels[u]`` lists the class indices of each of unit ``u``'s samples."""
    vectors = np.zeros((len(unit_labels), 1 + num_classes))
    for row, samples in enumerate(unit_labels):
        vectors[row, 0] = len(samples)
        for labels in samples:
            vectors[row, 1 + np.asarray(labels, dtype=int)] += 1
    return vectors


def allocate(vectors: np.ndarray, fractions: dict[str, float], seed: int) -> dict[str, list[int]]:
    """The unit indices of each part (in the order they were allocated), as the module docstring says."""
    names = list(fractions)
    totals = np.maximum(vectors.sum(axis=0), 1)
    targets = np.asarray([fractions[name] for name in names])[:, None] * vectors.sum(axis=0)
    weights = 1 / totals**2
    current = np.zeros_like(targets)
    rng = np.random.default_rng(seed)
    order = sorted(rng.permutation(len(vectors)), key=lambda row: -vectors[row, 0])
    assigned: dict[str, list[int]] = {name: [] for name in names}
    for row in order:
        vector = vectors[row]
        cost = (weights * vector * (2 * (current - targets) + vector)).sum(axis=1)
        best = int(np.argmin(cost))
        current[best] += vector
        assigned[names[best]].append(int(row))
    return assigned
