"""Task metrics, bootstrap intervals and KS distances against scikit-learn / scipy on known inputs."""

import numpy as np
import pytest
from scipy.special import expit, softmax
from scipy.stats import ks_2samp
from sklearn.metrics import accuracy_score, cohen_kappa_score, f1_score, roc_auc_score

from ilm_dist.eval.ks import ks_per_class
from ilm_dist.eval.metrics import PRIMARY, bootstrap_ci, compute_metrics, evaluate_predictions, probabilities


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_binary_metrics_match_sklearn():
    labels = np.array([0, 0, 1, 1, 0, 1, 1, 0])
    probs = np.array(
        [[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.45, 0.55], [0.2, 0.8], [0.7, 0.3], [0.1, 0.9], [0.8, 0.2]]
    )
    got = compute_metrics("binary", labels, probs, ("neg", "pos"))
    assert got["auc"] == pytest.approx(roc_auc_score(labels, probs[:, 1]))
    assert got["accuracy"] == pytest.approx(accuracy_score(labels, probs.argmax(1)))
    assert got["f1"] == pytest.approx(f1_score(labels, probs.argmax(1)))
    assert got["macro_f1"] == pytest.approx(f1_score(labels, probs.argmax(1), average="macro"))
    assert got["accuracy"] == pytest.approx(6 / 8)


def test_ordinal_quadratic_kappa(rng):
    labels = rng.integers(0, 5, 200)
    logits = rng.normal(size=(200, 5)) + 2 * np.eye(5)[labels]
    probs = probabilities("ordinal", logits)
    np.testing.assert_allclose(probs, softmax(logits, axis=1))
    got = compute_metrics("ordinal", labels, probs, tuple("01234"))
    assert got["kappa"] == pytest.approx(cohen_kappa_score(labels, probs.argmax(1), weights="quadratic"))
    assert got["accuracy"] == pytest.approx(accuracy_score(labels, probs.argmax(1)))
    assert set(got) == {"accuracy", "kappa"} and PRIMARY["ordinal"] == "kappa"


def test_nominal_multiclass_has_no_kappa_and_matches_sklearn(rng):
    labels = rng.integers(0, 4, 300)
    probs = softmax(rng.normal(size=(300, 4)) + 1.5 * np.eye(4)[labels], axis=1)
    got = compute_metrics("multiclass", labels, probs, tuple("abcd"))
    predicted = probs.argmax(1)
    assert set(got) == {"accuracy", "macro_f1", "macro_auc"} and PRIMARY["multiclass"] == "accuracy"
    assert got["accuracy"] == pytest.approx(accuracy_score(labels, predicted))
    assert got["macro_f1"] == pytest.approx(f1_score(labels, predicted, average="macro"))
    assert got["macro_auc"] == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr", average="macro"))


def test_kappa_depends_on_the_class_order():
    """Why ordinal tasks need their order: sorted DR folder names put the grades out of order."""
    grades = ("No_DR", "Mild", "Moderate", "Severe", "Proliferate")
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 5, 400)
    predicted = np.clip(truth + rng.choice([-1, 0, 0, 1], 400), 0, 4)  # mostly right, else one grade off
    in_grade_order = compute_metrics("ordinal", truth, np.eye(5)[predicted], grades)["kappa"]
    assert in_grade_order == pytest.approx(cohen_kappa_score(truth, predicted, weights="quadratic"))
    alphabetical = sorted(grades)
    position = np.array([alphabetical.index(name) for name in grades])  # grade -> alphabetical index
    shuffled = compute_metrics(
        "ordinal", position[truth], np.eye(5)[position[predicted]], tuple(alphabetical)
    )["kappa"]
    assert in_grade_order > 0.8 and shuffled < in_grade_order - 0.2


def test_unknown_task_is_an_error():
    with pytest.raises(ValueError, match="unknown task 'grades'"):
        compute_metrics("grades", np.array([0, 1, 2]), np.eye(3), tuple("abc"))


def test_multilabel_per_class_and_macro_auc(rng):
    labels = (rng.random((300, 4)) < 0.3).astype(int)
    logits = rng.normal(size=(300, 4)) + 1.5 * labels
    probs = probabilities("multilabel", logits)
    np.testing.assert_allclose(probs, expit(logits))
    got = compute_metrics("multilabel", labels, probs, ("a", "b", "c", "d"))
    for c, name in enumerate("abcd"):
        assert got[f"auc/{name}"] == pytest.approx(roc_auc_score(labels[:, c], probs[:, c]))
    assert got["macro_auc"] == pytest.approx(roc_auc_score(labels, probs, average="macro"))


def test_auc_is_nan_for_a_class_without_positives():
    labels = np.array([[1, 0], [0, 0], [1, 0]])
    got = compute_metrics("multilabel", labels, np.full((3, 2), 0.5), ("a", "b"))
    assert np.isnan(got["auc/b"]) and got["macro_auc"] == pytest.approx(0.5)


def test_bootstrap_ci_contains_estimate_and_is_deterministic(rng):
    labels = rng.integers(0, 2, 150)
    logits = rng.normal(size=(150, 2)) + np.eye(2)[labels]
    result = evaluate_predictions("binary", labels, logits, ("0", "1"), n_boot=200, seed=3)
    for name, (low, high) in result["ci95"].items():
        assert low <= result["metrics"][name] <= high, name
    again = bootstrap_ci("binary", labels, probabilities("binary", logits), ("0", "1"), 200, seed=3)
    assert again == result["ci95"]
    other = bootstrap_ci("binary", labels, probabilities("binary", logits), ("0", "1"), 200, seed=4)
    assert other != result["ci95"]
    assert result["primary"] == "auc"


def test_ks_matches_scipy(rng):
    a, b = rng.dirichlet(np.ones(3), 100), rng.dirichlet([3, 1, 1], 100)
    got = ks_per_class(a, b, "multiclass", ("x", "y", "z"))
    for c, name in enumerate("xyz"):
        ref = ks_2samp(a[:, c], b[:, c])
        assert got["per_class"][name] == {
            "statistic": pytest.approx(ref.statistic),
            "pvalue": pytest.approx(ref.pvalue),
        }
    assert got["mean_statistic"] == pytest.approx(
        np.mean([ks_2samp(a[:, c], b[:, c]).statistic for c in range(3)])
    )


def test_ks_binary_reports_the_positive_class_and_zero_for_identical(rng):
    p = rng.dirichlet([1, 1], 50)
    got = ks_per_class(p, p, "binary", ("neg", "pos"))
    assert list(got["per_class"]) == ["pos"] and got["mean_statistic"] == 0.0
