"""Weighted k-nearest-neighbour classification on L2-normalised features.

The monitor used by InstDisc (Wu et al. 2018) and MoCo-style repos: cosine similarity, the top
``k`` neighbours vote with weight ``exp(sim / T)``. Multi-hot labels vote for every finding they
carry, giving per-class scores (ranked by ROC AUC).
"""

from __future__ import annotations

import numpy as np
import torch


@torch.autocast("cpu", enabled=False)
def knn_scores(
    train: np.ndarray,
    train_targets: np.ndarray,
    test: np.ndarray,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> np.ndarray:
    """[N_test, C] vote mass per class; ``train_targets`` is class indices [N_train] (C: the largest + 1)
    or one-hot or multi-hot [N_train, C]. In fp32 whatever autocast the caller runs under (the trainer
    runs its validators under the run's autocast)."""
    train_t = torch.nn.functional.normalize(torch.as_tensor(train, dtype=torch.float32), dim=1)
    test_t = torch.nn.functional.normalize(torch.as_tensor(test, dtype=torch.float32), dim=1)
    targets = torch.as_tensor(_one_hot(train_targets), dtype=torch.float32)
    k = min(k, len(train_t))
    scores = []
    for start in range(0, len(test_t), chunk):
        sims, idx = (test_t[start : start + chunk] @ train_t.T).topk(k, dim=1)
        weights = (sims / temperature).exp()
        scores.append(torch.einsum("nk,nkc->nc", weights, targets[idx]))
    return torch.cat(scores).numpy()


def _one_hot(targets: np.ndarray) -> np.ndarray:
    """Class indices [N] as one-hot [N, C]; [N, C] targets as they are."""
    if np.ndim(targets) == 2:
        return targets
    labels = np.asarray(targets, dtype=np.int64)
    return np.eye(int(labels.max()) + 1, dtype=np.float32)[labels]


def knn_accuracy(
    train: np.ndarray,
    train_labels: np.ndarray,
    test: np.ndarray,
    test_labels: np.ndarray,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Share of ``test`` rows whose highest-scoring class (:func:`knn_scores`) is their label."""
    predicted = knn_scores(train, train_labels, test, k, temperature).argmax(axis=1)
    return float((predicted == np.asarray(test_labels)).mean())
