"""Kolmogorov-Smirnov distance between two models' output probabilities (Kaku et al. 2021, Sec. 5).

For each class, the two-sample KS statistic (scipy) between the predicted probabilities of that class
on the same test images, from a model fine-tuned on few labels and one fine-tuned on all labels.
Binary tasks report the positive class only (the other is its complement).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import ks_2samp


def ks_per_class(probs_a: np.ndarray, probs_b: np.ndarray, task: str, class_names: tuple[str, ...]) -> dict:
    """``{"per_class": {class: {"statistic", "pvalue"}}, "mean_statistic": mean over those classes}``."""
    if probs_a.shape != probs_b.shape:
        raise ValueError(
            f"ks_per_class: probability arrays differ in shape {probs_a.shape} vs {probs_b.shape}"
        )
    columns = [1] if task == "binary" else range(len(class_names))
    per_class = {}
    for c in columns:
        test = ks_2samp(probs_a[:, c], probs_b[:, c])
        per_class[class_names[c]] = {"statistic": float(test.statistic), "pvalue": float(test.pvalue)}
    return {
        "per_class": per_class,
        "mean_statistic": float(np.mean([v["statistic"] for v in per_class.values()])),
    }
