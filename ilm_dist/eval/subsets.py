"""Seeded, stratified label subsets (the 1% / 6% / 100% settings of Kaku et al. 2021, Sec. 4).

The subset is drawn by the stratified sampler the packer's splits use (`ilm_dist.data.stratify`, a
two-part allocation ``{subset: fraction, rest: 1 - fraction}``): every class (every finding of a
multi-label task) within about one sample of ``round(fraction * n_c)``, and the subset size within one
of ``round(fraction * N)``, "no finding" images included. A fraction that would give some class zero
samples is an error, not a silent omission. A subset is drawn once per (split, fraction, seed), saved under ``EVAL_DIR/subsets/``, and reused by every
method, so all methods are compared on exactly the same images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ilm_dist.data.manifest import Manifest
from ilm_dist.data.shard_format import squeeze_labels
from ilm_dist.data.shard_reader import ShardReader
from ilm_dist.data.stratify import allocate, count_vectors
from ilm_dist.eval.errors import EvalError
from ilm_dist.eval.store import SUBSETS, dataset_id, digest, fraction_tag, read_json, write_json


def subset_count(fraction: float, n: int) -> int:
    """Samples of a class (or of the split) that a ``fraction`` keeps out of ``n``: ``round(fraction * n)``."""
    return int(np.floor(fraction * n + 0.5))


def stratified_subset(
    labels: np.ndarray, fraction: float, seed: int, class_names: tuple[str, ...]
) -> np.ndarray:
    """Sorted indices of a stratified ``fraction`` of ``labels`` ([N] class ids or [N, C] multi-hot)."""
    if not 0 < fraction <= 1:
        raise EvalError(f"label fraction {fraction}: must be in (0, 1]")
    if fraction == 1:
        return np.arange(len(labels))
    multi_hot = labels if labels.ndim == 2 else np.eye(len(class_names), dtype=np.int64)[labels]
    positives = multi_hot.sum(axis=0)
    targets = np.array([subset_count(fraction, int(n)) for n in positives])
    for name, n, target in zip(class_names, positives, targets, strict=True):
        if target == 0:
            raise EvalError(
                f"label fraction {fraction} leaves class {name!r} empty ({n} samples x {fraction} = "
                f"{n * fraction:.2f}); use a larger fraction"
            )
    vectors = count_vectors([[np.flatnonzero(row)] for row in multi_hot], len(class_names))
    return np.sort(allocate(vectors, {"subset": fraction, "rest": 1 - fraction}, seed)["subset"])


def split_labels(reader: ShardReader) -> np.ndarray:
    """All labels of a split, [N] or [N, C], read from the ``.lbl`` records only."""
    return squeeze_labels(np.stack([reader.label(i) for i in range(len(reader))]))


def subset_path(eval_dir: Path, split: str, fraction: float, seed: int) -> Path:
    return Path(eval_dir) / SUBSETS / f"{split}_{fraction_tag(fraction)}_s{seed}.json"


def load_or_draw_subset(eval_dir: Path, manifest: Manifest, split: str, fraction: float, seed: int) -> dict:
    """The saved subset for (split, fraction, seed), drawing and saving it the first time."""
    path = subset_path(eval_dir, split, fraction, seed)
    if path.is_file():
        subset = read_json(path)
        if subset["dataset_id"] != dataset_id(manifest):
            raise EvalError(
                f"{path} was drawn from another packed dataset ({subset['data']}), not {manifest.root}; "
                "use another eval directory"
            )
        return subset
    reader = ShardReader(manifest, split)
    labels = split_labels(reader)
    indices = stratified_subset(labels, fraction, seed, manifest.class_names)
    picked = labels[indices]
    counts = picked.sum(axis=0) if picked.ndim == 2 else np.bincount(picked, minlength=manifest.num_classes)
    subset = {
        "split": split,
        "fraction": fraction,
        "seed": seed,
        "data": str(manifest.root),
        "dataset_id": dataset_id(manifest),
        "num_samples": len(indices),
        "class_counts": dict(zip(manifest.class_names, counts.tolist(), strict=True)),
        "indices": indices.tolist(),
        "keys": [reader.key(int(i)) for i in indices],
    }
    subset["digest"] = digest(subset["keys"])
    write_json(path, subset)
    return subset
