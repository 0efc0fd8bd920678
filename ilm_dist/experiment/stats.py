"""Paired differences between methods with a two-level bootstrap over pretraining seeds and test images,
and intervals over seeds.

Every method of every seed is scored on the same test images (and, within a seed, fine-tuned on the same
label subsets), so two methods are compared on each seed's saved test predictions, image by image. The
difference of methods a and b is the mean over seeds of ``metric(a, s) - metric(b, s)`` on the whole
test split (the metric per task of :mod:`ilm_dist.eval.metrics`). Its 95% interval comes from
``n_boot`` resamples, each drawn as::

    rng = numpy.random.default_rng(seed)
    images = rng.integers(0, N, size=(n_boot, N))   # test images, with replacement
    seeds = rng.integers(0, K, size=(n_boot, K))    # pretraining seeds, with replacement

Resample ``r`` takes the seeds ``seeds[r]`` and, for each of them, the metric difference of the two
methods on the same images ``images[r]``; the statistic is their mean, and the interval the 2.5/97.5
percentiles over resamples (resamples where the metric is undefined, e.g. an AUC with one class only,
are left out). The image resample is shared by the seeds of a resample because every seed was scored
on the same test images: their sampling noise is common to all seeds, and drawing it anew per seed
would average it away and make the interval too narrow. Every comparison and method uses the same
draws, so a method's resampled metrics are computed once.

Means over seeds come with a Student-t interval (``mean +- t(0.975, K-1) * sd / sqrt(K)``), none with
one seed.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import sklearn
from scipy import stats

from ilm_dist.eval.metrics import compute_metrics

LEVEL = 0.95
CHUNK_ROWS = 64  # resamples ranked at once (memory: CHUNK_ROWS x test images x classes)


@dataclass(frozen=True)
class Resamples:
    images: np.ndarray  # [n_boot, N] test-image indices
    seeds: np.ndarray  # [n_boot, K] indices into the seed list

    @classmethod
    def draw(cls, n_images: int, n_seeds: int, n_boot: int, seed: int) -> Resamples:
        rng = np.random.default_rng(seed)
        images = rng.integers(0, n_images, size=(n_boot, n_images))
        return cls(images, rng.integers(0, n_seeds, size=(n_boot, n_seeds)))


@dataclass(frozen=True)
class Scores:
    """One method's metric on each seed: on the whole test split ``[K]`` and on each resample ``[n_boot, K]``."""

    full: np.ndarray
    resampled: np.ndarray


def score(
    task: str,
    labels: np.ndarray,
    probs_per_seed: list[np.ndarray],
    class_names: tuple[str, ...],
    metric: str,
    resamples: Resamples,
) -> Scores:
    """``metric`` of each seed's test probabilities, on the whole test split and on every image resample."""
    full = [compute_metrics(task, labels, probs, class_names)[metric] for probs in probs_per_seed]
    resampled = [
        resampled_metric(task, labels, probs, class_names, metric, resamples.images)
        for probs in probs_per_seed
    ]
    return Scores(np.array(full), np.stack(resampled, axis=1))


def resampled_metric(
    task: str,
    labels: np.ndarray,
    probs: np.ndarray,
    class_names: tuple[str, ...],
    metric: str,
    images: np.ndarray,
) -> np.ndarray:
    """``metric`` on each row of image indices ``images`` ``[n_boot, N]``: the value
    :func:`~ilm_dist.eval.metrics.compute_metrics` gives on ``labels[row], probs[row]``, all rows at once
    for the AUCs and accuracy (one sklearn call per resample and metric would dominate the report's time)."""
    rows = [images[i : i + CHUNK_ROWS] for i in range(0, len(images), CHUNK_ROWS)]
    if metric in ("auc", "macro_auc"):
        if task == "binary":
            return np.concatenate([_auc_rows(labels[r] == 1, probs[r, 1]) for r in rows])
        targets = (
            labels.astype(bool) if task == "multilabel" else labels[:, None] == np.arange(len(class_names))
        )
        return np.concatenate([_macro_auc_rows(targets[r], probs[r]) for r in rows])
    if metric == "accuracy" and task != "multilabel":
        correct = probs.argmax(axis=1) == labels
        return correct[images].mean(axis=1)
    with sklearn.config_context(skip_parameter_validation=True, assume_finite=True):
        return np.array([compute_metrics(task, labels[r], probs[r], class_names)[metric] for r in images])


def _auc_rows(positive: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """ROC AUC of each row: the Mann-Whitney statistic ``U / (n_pos n_neg)`` from mid-ranks, which is
    sklearn's trapezoidal AUC, ties included; NaN where a row has one label value only."""
    ranks = stats.rankdata(scores, axis=1)
    n_pos = positive.sum(axis=1)
    n_neg = positive.shape[1] - n_pos
    u = (ranks * positive).sum(axis=1) - n_pos * (n_pos + 1) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = u / (n_pos * n_neg)
    auc[(n_pos == 0) | (n_neg == 0)] = np.nan
    return auc


def _macro_auc_rows(targets: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Mean over classes of each row's one-vs-rest AUC, over the classes with both label values
    (``targets``, ``probs``: ``[rows, N, C]``)."""
    per_class = np.stack([_auc_rows(targets[..., c], probs[..., c]) for c in range(probs.shape[-1])], axis=1)
    with warnings.catch_warnings():  # a row where no class has both label values: NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(per_class, axis=1)


@dataclass(frozen=True)
class Difference:
    diff: float
    ci: tuple[float, float]


def paired_difference(a: Scores, b: Scores, resamples: Resamples, level: float = LEVEL) -> Difference:
    """Mean over seeds of ``a - b``, with its two-level bootstrap interval (see the module docstring)."""
    per_resample = np.take_along_axis(a.resampled - b.resampled, resamples.seeds, axis=1).mean(axis=1)
    kept = per_resample[~np.isnan(per_resample)]
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(kept, [tail, 100 - tail]) if len(kept) else (math.nan, math.nan)
    return Difference(float(np.mean(a.full - b.full)), (float(low), float(high)))


@dataclass(frozen=True)
class SeedSummary:
    mean: float
    std: float  # sample standard deviation over seeds (NaN for one seed)
    ci: tuple[float, float]  # Student-t interval of the mean (NaN for one seed)
    n: int


def over_seeds(values: list[float] | np.ndarray, level: float = LEVEL) -> SeedSummary:
    values = np.asarray(values, dtype=float)
    mean, n = float(values.mean()), len(values)
    if n < 2:
        return SeedSummary(mean, math.nan, (math.nan, math.nan), n)
    std = float(values.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n)
    return SeedSummary(mean, std, (mean - half, mean + half), n)
