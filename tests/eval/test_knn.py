"""Weighted kNN against a brute-force float64 NumPy computation and scikit-learn's neighbour classifier."""

import numpy as np
import pytest
import torch
from sklearn.neighbors import KNeighborsClassifier

from ilm_dist.eval.knn import knn_accuracy, knn_scores


def reference_scores(train, targets, test, k: int, temperature: float) -> np.ndarray:
    """Cosine similarity to every training row, the k most similar vote with exp(sim / T) (float64)."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    sims = test @ train.T
    k = min(k, len(train))
    scores = np.zeros((len(test), targets.shape[1]))
    for i, row in enumerate(sims):
        for j in np.argsort(-row, kind="stable")[:k]:
            scores[i] += np.exp(row[j] / temperature) * targets[j]
    return scores


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(60, 8))
    test = rng.normal(size=(25, 8))
    labels = rng.integers(0, 4, size=60)
    return train, labels, test


@pytest.mark.parametrize(("k", "temperature"), [(1, 0.07), (5, 0.07), (20, 0.5), (60, 1.0)])
def test_scores_match_brute_force(data, k, temperature):
    train, labels, test = data
    one_hot = np.eye(4)[labels]
    got = knn_scores(train, one_hot, test, k=k, temperature=temperature)
    want = reference_scores(train, one_hot, test, k, temperature)
    assert got.shape == (25, 4) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_scores_are_independent_of_chunking_and_feature_scale(data):
    train, labels, test = data
    one_hot = np.eye(4)[labels]
    whole = knn_scores(train, one_hot, test, k=7)
    np.testing.assert_allclose(knn_scores(train, one_hot, test, k=7, chunk=3), whole, rtol=1e-5)
    np.testing.assert_allclose(knn_scores(train * 13.0, one_hot, test * 0.01, k=7), whole, rtol=1e-5)


def test_k_larger_than_the_training_set_uses_every_row(data):
    train, labels, test = data
    one_hot = np.eye(4)[labels][:6]
    got = knn_scores(train[:6], one_hot, test, k=50, temperature=0.2)
    np.testing.assert_allclose(got, reference_scores(train[:6], one_hot, test, 6, 0.2), rtol=1e-5)
    # every training row voted: each test row's total vote mass is the sum over all six weights
    sims = (test / np.linalg.norm(test, axis=1, keepdims=True)) @ (
        train[:6] / np.linalg.norm(train[:6], axis=1, keepdims=True)
    ).T
    np.testing.assert_allclose(got.sum(axis=1), np.exp(sims / 0.2).sum(axis=1), rtol=1e-5)


def test_tied_neighbours_vote_with_equal_weight():
    # two identical training rows with different labels, both among the neighbours: equal votes
    train = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    one_hot = np.eye(3)[[0, 1, 2, 2]]
    test = np.array([[2.0, 0.0], [0.6, 0.8]])
    got = knn_scores(train, one_hot, test, k=2, temperature=0.1)
    assert got[0, 0] == got[0, 1] == pytest.approx(np.exp(10.0), rel=1e-5) and got[0, 2] == 0
    # second row: the two duplicates (sim 0.6) tie for the last place behind row 2 (sim 0.8): the vote
    # mass is the same whichever of them is taken
    assert got[1, 2] == pytest.approx(np.exp(8.0), rel=1e-5)
    assert got[1, 0] + got[1, 1] == pytest.approx(np.exp(6.0), rel=1e-5)


def test_multi_hot_neighbours_vote_for_every_finding_they_carry():
    rng = np.random.default_rng(1)
    train, test = rng.normal(size=(40, 6)), rng.normal(size=(10, 6))
    findings = (rng.random((40, 5)) < 0.3).astype(np.float64)
    findings[:5] = 0  # "no finding" rows vote for nothing
    got = knn_scores(train, findings, test, k=9, temperature=0.1)
    np.testing.assert_allclose(got, reference_scores(train, findings, test, 9, 0.1), rtol=1e-5)
    single = knn_scores(train[:1], np.array([[1.0, 0.0, 1.0]]), test, k=3)
    np.testing.assert_array_equal(single[:, 0], single[:, 2])
    assert (single[:, 1] == 0).all() and (single[:, 0] > 0).all()


def test_predictions_and_accuracy_agree_with_scikit_learn(data):
    train, labels, test = data
    temperature = 0.1
    test_labels = np.random.default_rng(2).integers(0, 4, size=len(test))
    # scikit-learn's cosine distance is 1 - sim: the same neighbours, weighted exp((1 - d) / T)
    sk = KNeighborsClassifier(
        n_neighbors=10, metric="cosine", algorithm="brute", weights=lambda d: np.exp((1 - d) / temperature)
    ).fit(train, labels)
    np.testing.assert_array_equal(
        knn_scores(train, labels, test, k=10, temperature=temperature).argmax(axis=1), sk.predict(test)
    )
    assert knn_accuracy(train, labels, test, test_labels, k=10, temperature=temperature) == pytest.approx(
        sk.score(test, test_labels)
    )


def test_scores_stay_fp32_under_the_callers_bf16_autocast(data):
    """The trainer runs its validators (the kNN monitor) under the run's autocast: bf16 on an AMX CPU
    with engine.cpu_autocast=auto, where the scores once came back as bf16 and NumPy refused them."""
    train, labels, test = data
    targets = np.eye(4)[labels]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = knn_scores(train, targets, test, k=5, temperature=0.1)
    assert scores.dtype == np.float32
    np.testing.assert_allclose(scores, reference_scores(train, targets, test, 5, 0.1), rtol=1e-4)
