"""Pure-PyTorch reference of the batched Barlow Twins cross-correlation loss.

This is the official per-block computation (Zbontar et al. 2021, as used by Kaku et al. 2021),
vectorised over a leading layer axis: for each layer ``l``

    z1n = (z1 - mean_N z1) / sqrt(var_N z1 + eps)       # BatchNorm1d(affine=False), biased var
    C   = z1n^T z2n / N                                  # D x D cross-correlation
    loss_l = on_weight[l] * sum_i (C_ii - 1)^2 + off_weight[l] * sum_{i != j} C_ij^2
"""

from __future__ import annotations

import torch
from torch import Tensor


def batch_standardize(z: Tensor, eps: float) -> Tensor:
    """Standardise each feature over the batch axis (-2) with the biased variance, like BatchNorm1d."""
    mean = z.mean(dim=-2, keepdim=True)
    var = z.var(dim=-2, unbiased=False, keepdim=True)
    return (z - mean) / torch.sqrt(var + eps)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the loss is computed and returned in: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def bt_xcorr_loss_reference(
    z1: Tensor, z2: Tensor, on_weight: Tensor, off_weight: Tensor, eps: float = 1e-5
) -> Tensor:
    """Per-layer Barlow Twins losses for stacked projections ``z1, z2: [L, N, D]``; returns ``[L]``.

    Computed in float32 (float64 for float64 inputs), whatever the input dtype.
    """
    dtype = compute_dtype(z1.dtype)
    z1n = batch_standardize(z1.to(dtype), eps)
    z2n = batch_standardize(z2.to(dtype), eps)
    n = z1.shape[-2]
    c = z1n.transpose(-1, -2) @ z2n / n
    diag = torch.diagonal(c, dim1=-2, dim2=-1)
    on_diag = (diag - 1).pow(2).sum(-1)
    off_diag = c.pow(2).sum((-1, -2)) - diag.pow(2).sum(-1)
    return on_weight.to(dtype) * on_diag + off_weight.to(dtype) * off_diag
