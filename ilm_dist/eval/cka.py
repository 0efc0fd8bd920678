"""Centered kernel alignment (Kornblith et al. 2019) between block features before and after fine-tuning.

- :func:`linear_cka` is Gram-free: with column-centred features ``X`` [n, d1], ``Y`` [n, d2],
  ``HSIC(XX^T, YY^T) ∝ ||Y^T X||_F^2``, so CKA = ``||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)``. The
  d x d products are accumulated over row chunks in float64: memory O(d1 d2 + chunk d), time O(n d^2),
  never an n x n matrix — usable on a whole test split.
- :func:`rbf_cka` needs the n x n kernels, so it runs on random subsets (:func:`subset_rbf_cka`), as the
  official code does (Kaku et al. 2021: mean over 50 random subsets of 1000 samples, RBF sigma 0.8).
  The official code applies sigma = 0.8 to the raw feature distances, which makes the kernel depend on
  the features' scale; by default sigma is 0.8 x the median pairwise distance instead (Kornblith et
  al. 2019's "RBF 0.8"), invariant to isotropic scaling. ``relative=False`` gives the official form.
Both use the biased HSIC estimator with the centring ``HKH`` of the official code.
"""

from __future__ import annotations

import numpy as np

RBF_SIGMA = 0.8  # Kaku et al. 2021 (official CKA code), after Kornblith et al. 2019
NUM_SUBSETS = 50  # official code
SUBSET_SIZE = 1000  # official code


def linear_cka(x: np.ndarray, y: np.ndarray, chunk: int = 4096) -> float:
    """Linear CKA of two feature matrices over the same n samples (Gram-free, float64)."""
    if len(x) != len(y):
        raise ValueError(f"linear_cka: {len(x)} vs {len(y)} samples")
    mean_x, mean_y = x.mean(axis=0, dtype=np.float64), y.mean(axis=0, dtype=np.float64)
    xy = np.zeros((y.shape[1], x.shape[1]))
    xx = np.zeros((x.shape[1], x.shape[1]))
    yy = np.zeros((y.shape[1], y.shape[1]))
    for start in range(0, len(x), chunk):
        xc = x[start : start + chunk].astype(np.float64) - mean_x
        yc = y[start : start + chunk].astype(np.float64) - mean_y
        xy += yc.T @ xc
        xx += xc.T @ xc
        yy += yc.T @ yc
    return float((xy**2).sum() / np.sqrt((xx**2).sum() * (yy**2).sum()))


def _center(k: np.ndarray) -> np.ndarray:
    """``H K H`` with ``H = I - 11^T / n``, without forming ``H``."""
    return k - k.mean(axis=0, keepdims=True) - k.mean(axis=1, keepdims=True) + k.mean()


def _sq_dists(x: np.ndarray) -> np.ndarray:
    norms = (x**2).sum(axis=1)
    return np.maximum(norms[:, None] + norms[None, :] - 2 * x @ x.T, 0.0)


def rbf_kernel(x: np.ndarray, sigma: float = RBF_SIGMA, relative: bool = True) -> np.ndarray:
    """``exp(-||xi - xj||^2 / (2 s^2))``; ``s = sigma x median distance`` when ``relative``."""
    d2 = _sq_dists(x.astype(np.float64))
    if relative:
        off_diag = d2[~np.eye(len(d2), dtype=bool)]
        median = np.median(off_diag[off_diag > 0]) if (off_diag > 0).any() else 1.0
        sigma = sigma * np.sqrt(median)
    return np.exp(-d2 / (2 * sigma**2))


def rbf_cka(x: np.ndarray, y: np.ndarray, sigma: float = RBF_SIGMA, relative: bool = True) -> float:
    """RBF-kernel CKA on all rows of ``x`` and ``y`` (n x n kernels: use subsets for large n)."""
    kx, ky = _center(rbf_kernel(x, sigma, relative)), _center(rbf_kernel(y, sigma, relative))
    return float((kx * ky).sum() / np.sqrt((kx * kx).sum() * (ky * ky).sum()))


def subset_plan(n: int, num_subsets: int, subset_size: int) -> tuple[int, int]:
    """``(draws, size)``: all ``n`` samples once when ``n <= subset_size``, else ``num_subsets`` draws."""
    return (1, n) if n <= subset_size else (num_subsets, subset_size)


def subset_rbf_cka(
    x: np.ndarray,
    y: np.ndarray,
    num_subsets: int = NUM_SUBSETS,
    subset_size: int = SUBSET_SIZE,
    seed: int = 0,
    sigma: float = RBF_SIGMA,
    relative: bool = True,
) -> tuple[float, float]:
    """Mean and std of RBF CKA over random subsets without replacement (official ``bootstrap_similarity``)."""
    rng = np.random.default_rng(seed)
    draws, size = subset_plan(len(x), num_subsets, subset_size)
    values = []
    for _ in range(draws):
        idx = rng.permutation(len(x))[:size]
        values.append(rbf_cka(x[idx], y[idx], sigma, relative))
    return float(np.mean(values)), float(np.std(values))
