"""Weighted k-nearest-neighbour classification on L2-normalised features.

The monitor used by InstDisc (Wu et al. 2018) and MoCo-style repos: cosine similarity, the top
``k`` neighbours vote with weight ``exp(sim / T)``. Multi-hot labels vote for every finding they
carry, giving per-class scores (ranked by ROC AUC).
"""

from __future__ import annotations

import numpy as np
import torch


def knn_scores(
    train: np.ndarray,
    train_targets: np.ndarray,
    test: np.ndarray,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> np.ndarray:
    """[N_test, C] vote mass per class; ``train_targets`` is one-hot or multi-hot [N_train, C]. In fp32
    whatever autocast the caller runs under (the trainer runs its validators under the run's autocast)."""
    with torch.autocast("cpu", enabled=False):
        return _knn_scores(train, train_targets, test, k, temperature, chunk)


def _knn_scores(
    train: np.ndarray, train_targets: np.ndarray, test: np.ndarray, k: int, temperature: float, chunk: int
) -> np.ndarray:
    train_t = torch.nn.functional.normalize(torch.as_tensor(train, dtype=torch.float32), dim=1)
    test_t = torch.nn.functional.normalize(torch.as_tensor(test, dtype=torch.float32), dim=1)
    targets = torch.as_tensor(train_targets, dtype=torch.float32)
    k = min(k, len(train_t))
    scores = []
    for start in range(0, len(test_t), chunk):
        sims, idx = (test_t[start : start + chunk] @ train_t.T).topk(k, dim=1)
        weights = (sims / temperature).exp()
        scores.append(torch.einsum("nk,nkc->nc", weights, targets[idx]))
    return torch.cat(scores).numpy()


def knn_predict(
    train: np.ndarray,
    train_labels: np.ndarray,
    test: np.ndarray,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> np.ndarray:
    """Predicted class for each test row (single-label ``train_labels`` as class indices)."""
    labels = np.asarray(train_labels, dtype=np.int64)
    one_hot = np.eye(int(labels.max()) + 1, dtype=np.float32)[labels]
    return knn_scores(train, one_hot, test, k, temperature, chunk).argmax(axis=1)


def knn_accuracy(
    train: np.ndarray,
    train_labels: np.ndarray,
    test: np.ndarray,
    test_labels: np.ndarray,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    return float((knn_predict(train, train_labels, test, k, temperature) == np.asarray(test_labels)).mean())
