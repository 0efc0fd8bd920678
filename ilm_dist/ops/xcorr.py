"""Batched Barlow Twins cross-correlation loss: typed wrapper, implementation selector, global-batch version.

``torch.ops.ilm_dist.bt_xcorr_loss`` (csrc/) computes, for all layers of stacked ``z1, z2: [L, N, D]`` at
once, the batch standardisation, ``||C||_F^2`` from the N x N Gram matrices when that is cheaper than the
D x D cross-correlation ``C``, and ``diag(C)`` with a fused per-feature dot product. Its backward
(``bt_xcorr_loss_backward``) recomputes those from ``z1, z2`` instead of saving activations.
"""

from __future__ import annotations

import functools
import logging
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor

from ilm_dist.distributed import all_gather_with_grad
from ilm_dist.ops._extension import LOAD_ERROR, extension_available
from ilm_dist.ops.reference import bt_xcorr_loss_reference, compute_dtype

Impl = Literal["auto", "ext", "torch"]

logger = logging.getLogger("ilm_dist")


def bt_xcorr_loss(
    z1: Tensor, z2: Tensor, on_weight: Tensor, off_weight: Tensor, eps: float = 1e-5, impl: Impl = "auto"
) -> Tensor:
    """Per-layer Barlow Twins losses of ``z1, z2: [L, N, D]`` (contiguous, same dtype/device); returns ``[L]``.

    ``loss_l = on_weight[l] * sum_i (C_ii - 1)^2 + off_weight[l] * sum_{i != j} C_ij^2`` with ``C`` the
    cross-correlation of the batch-standardised (biased variance, ``eps``) inputs. The result is float32
    (float64 for float64 inputs); fp16/bf16 inputs are accumulated in float32. Differentiable w.r.t.
    ``z1`` and ``z2`` only. ``impl``: ``"ext"`` the C++/CUDA op, ``"torch"`` the pure-PyTorch reference,
    ``"auto"`` the op when it is built, else the reference (logged once).
    """
    if _use_extension(impl):
        return torch.ops.ilm_dist.bt_xcorr_loss.default(z1, z2, on_weight, off_weight, eps)
    return bt_xcorr_loss_reference(z1, z2, on_weight, off_weight, eps)


def bt_xcorr_loss_global(
    z1: Tensor,
    z2: Tensor,
    on_weight: Tensor,
    off_weight: Tensor,
    eps: float = 1e-5,
    group: dist.ProcessGroup | None = None,
    impl: Impl = "auto",
) -> Tensor:
    """:func:`bt_xcorr_loss` on the global batch: ``z1, z2: [L, N_local, D]`` are all-gathered along N.

    Every rank of ``group`` (default: the world) must pass the same ``N_local``; the global batch is the
    concatenation in rank order, so the statistics and ``C`` are those of all ranks' samples. Without an
    initialised process group (or with one rank) this is :func:`bt_xcorr_loss`.

    Gradient convention: every rank computes the identical global loss, and the backward of the
    differentiable all_gather sums (all_reduce) the gradients that all ranks computed for the global batch
    and keeps this rank's slice, so the gradient w.r.t. the local ``z`` is ``world_size`` times the
    single-process global-batch gradient of that slice. The data-parallel engine (DDP, DeepSpeed) then
    averages parameter gradients over ranks, which gives exactly the single-process global-batch gradient.
    (The official Barlow Twins code's plain, autograd-unaware ``all_reduce(C)`` gives each rank only the
    gradient of its own slice, so after the engine's averaging its gradients are ``1/world_size`` too small.)
    """
    z1, z2 = all_gather_with_grad(z1, dim=1, group=group), all_gather_with_grad(z2, dim=1, group=group)
    return bt_xcorr_loss(z1, z2, on_weight, off_weight, eps, impl)


def _use_extension(impl: Impl) -> bool:
    if impl == "torch":
        return False
    if impl == "ext":
        if not extension_available():
            raise RuntimeError(
                f"bt_xcorr_loss(impl='ext'): the ilm_dist._C extension is not available ({LOAD_ERROR}); "
                "build it with `pip install --no-build-isolation -e .`"
            )
        return True
    if impl != "auto":
        raise ValueError(f"bt_xcorr_loss: impl must be 'auto', 'ext' or 'torch', got {impl!r}")
    if not extension_available():
        _log_fallback()
    return extension_available()


@functools.cache
def _log_fallback() -> None:
    logger.warning(
        "ilm_dist._C extension not available (%s); bt_xcorr_loss uses the PyTorch reference", LOAD_ERROR
    )


def _fake_loss(z1: Tensor, z2: Tensor, on_weight: Tensor, off_weight: Tensor, eps: float) -> Tensor:
    torch._check(z1.dim() == 3, lambda: f"bt_xcorr_loss: z1 must be a 3-D [L, N, D] tensor, got {z1.shape}")
    torch._check(
        z1.shape == z2.shape, lambda: f"bt_xcorr_loss: z1 and z2 shapes differ: {z1.shape}, {z2.shape}"
    )
    return z1.new_empty((z1.shape[0],), dtype=compute_dtype(z1.dtype))


def _fake_backward(
    grad_loss: Tensor, z1: Tensor, z2: Tensor, on_weight: Tensor, off_weight: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    return torch.empty_like(z1), torch.empty_like(z2)


def _setup_context(ctx, inputs: tuple, output: Tensor) -> None:
    z1, z2, on_weight, off_weight, eps = inputs
    if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
        raise NotImplementedError("bt_xcorr_loss is not differentiable w.r.t. on_weight/off_weight")
    ctx.save_for_backward(z1, z2, on_weight, off_weight)
    ctx.eps = eps


def _backward(ctx, grad_loss: Tensor) -> tuple[Tensor | None, ...]:
    z1, z2, on_weight, off_weight = ctx.saved_tensors
    dz1, dz2 = torch.ops.ilm_dist.bt_xcorr_loss_backward.default(
        grad_loss.contiguous(), z1, z2, on_weight, off_weight, ctx.eps
    )
    return (
        dz1 if ctx.needs_input_grad[0] else None,
        dz2 if ctx.needs_input_grad[1] else None,
        None,
        None,
        None,
    )


if extension_available():
    torch.library.register_fake("ilm_dist::bt_xcorr_loss", _fake_loss)
    torch.library.register_fake("ilm_dist::bt_xcorr_loss_backward", _fake_backward)
    torch.library.register_autograd("ilm_dist::bt_xcorr_loss", _backward, setup_context=_setup_context)
