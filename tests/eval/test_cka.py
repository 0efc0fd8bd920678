"""CKA properties and agreement with the direct centering-matrix formula in float64."""

import numpy as np
import pytest
from scipy.stats import ortho_group

from ilm_dist.eval.cka import linear_cka, rbf_cka, subset_rbf_cka


def centering_matrix_cka(kx: np.ndarray, ky: np.ndarray) -> float:
    """CKA from Gram matrices with H = I - 11^T/n, as in the official CKA.py (written out, float64)."""
    n = len(kx)
    h = np.eye(n) - np.ones((n, n)) / n

    def hsic(a, b):
        return np.sum((h @ a @ h) * (h @ b @ h))

    return hsic(kx, ky) / np.sqrt(hsic(kx, kx) * hsic(ky, ky))


def gaussian_gram(x: np.ndarray, sigma: float) -> np.ndarray:
    d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    return np.exp(-d2 / (2 * sigma**2))


@pytest.fixture
def feats():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 16))
    y = np.tanh(x @ rng.normal(size=(16, 24))) + 0.3 * rng.normal(size=(120, 24))
    return x, y


def test_self_similarity_is_one(feats):
    x, _ = feats
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert rbf_cka(x, x) == pytest.approx(1.0)


def test_linear_matches_centering_matrix_formula(feats):
    x, y = feats
    assert linear_cka(x, y) == pytest.approx(centering_matrix_cka(x @ x.T, y @ y.T), rel=1e-10)


def test_linear_is_chunk_independent_and_float32_safe(feats):
    x, y = feats
    ref = linear_cka(x, y)
    assert linear_cka(x, y, chunk=7) == pytest.approx(ref, rel=1e-12)
    assert linear_cka(x.astype(np.float32), y.astype(np.float32), chunk=13) == pytest.approx(ref, rel=1e-5)


def test_rbf_matches_centering_matrix_formula(feats):
    x, y = feats
    assert rbf_cka(x, y, sigma=3.0, relative=False) == pytest.approx(
        centering_matrix_cka(gaussian_gram(x, 3.0), gaussian_gram(y, 3.0)), rel=1e-9
    )
    med_x = np.sqrt(np.median(((x[:, None] - x[None]) ** 2).sum(-1)[~np.eye(len(x), dtype=bool)]))
    med_y = np.sqrt(np.median(((y[:, None] - y[None]) ** 2).sum(-1)[~np.eye(len(y), dtype=bool)]))
    assert rbf_cka(x, y, sigma=0.8) == pytest.approx(
        centering_matrix_cka(gaussian_gram(x, 0.8 * med_x), gaussian_gram(y, 0.8 * med_y)), rel=1e-9
    )


def test_invariant_to_orthogonal_transform_and_isotropic_scaling(feats):
    x, y = feats
    q = ortho_group.rvs(y.shape[1], random_state=1)
    for transformed in (y @ q, 7.5 * y, 0.01 * y @ q):
        assert linear_cka(x, transformed) == pytest.approx(linear_cka(x, y), rel=1e-9)
        assert rbf_cka(x, transformed) == pytest.approx(rbf_cka(x, y), rel=1e-9)


def test_absolute_sigma_is_scale_dependent_and_degenerates_on_spread_out_features():
    rng = np.random.default_rng(3)
    x, z = rng.normal(size=(120, 16)), rng.normal(size=(120, 16))  # unrelated; distances ~ 5.7 >> 0.8
    assert rbf_cka(x, z) < 0.5
    assert rbf_cka(x, z, relative=False) > 0.99  # both kernels ~ identity: the official absolute sigma
    assert rbf_cka(0.05 * x, 0.05 * z, relative=False) < 0.5  # ...depends on the features' scale


def test_unrelated_features_score_low():
    rng = np.random.default_rng(1)
    assert linear_cka(rng.normal(size=(2000, 8)), rng.normal(size=(2000, 8))) < 0.05


def test_subset_cka_is_seeded_and_uses_all_samples_when_few(feats):
    x, y = feats
    mean, std = subset_rbf_cka(x, y, num_subsets=5, subset_size=50, seed=2)
    assert (mean, std) == subset_rbf_cka(x, y, num_subsets=5, subset_size=50, seed=2)
    assert std > 0
    assert subset_rbf_cka(x, y, subset_size=1000) == (pytest.approx(rbf_cka(x, y)), 0.0)
