"""Batched Barlow Twins cross-correlation loss: typed wrapper, self-check, implementation selector, global batch.

``torch.ops.ilm_dist.bt_xcorr_loss`` (csrc/) computes, for all layers of stacked ``z1, z2: [L, N, D]`` at
once, the batch standardisation, ``diag(C)`` with a fused per-feature dot product, and ``||C||_F^2``
either from the N x N Gram matrices (when ``2N <= D``; nothing saved for the backward) or from the D x D
cross-correlation ``N C``, which the op returns as its second output ``xcorr`` and the backward reuses.
The backward (``bt_xcorr_loss_backward``) recomputes the standardisation from ``z1, z2``.

Before the op's first use on a device and dtype, :func:`bt_xcorr_loss` compares its loss and gradients
with the float64 reference on small random inputs in both formulations (:func:`check_extension`). A
mismatch (or an error) logs a warning naming the device, dtype and error, and that device and dtype then
use the PyTorch reference (``impl="auto"``) or raise (``impl="ext"``), so a kernel bug cannot silently
train a model wrong.
"""

from __future__ import annotations

import functools
import logging
import warnings
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from ilm_dist.distributed import all_gather_with_grad
from ilm_dist.ops._extension import LOAD_ERROR, extension_available
from ilm_dist.ops.reference import bt_xcorr_loss_reference, compute_dtype

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

Impl = Literal["auto", "ext", "torch"]

logger = logging.getLogger("ilm_dist")


def bt_xcorr_loss(
    z1: Tensor, z2: Tensor, on_weight: Tensor, off_weight: Tensor, eps: float = 1e-5, impl: Impl = "auto"
) -> Tensor:
    """Per-layer Barlow Twins losses of ``z1, z2: [L, N, D]`` (same dtype and device); returns ``[L]``.

    ``loss_l = on_weight[l] * sum_i (C_ii - 1)^2 + off_weight[l] * sum_{i != j} C_ij^2`` with ``C`` the
    cross-correlation of the batch-standardised (biased variance, ``eps``) inputs. The result is float32
    (float64 for float64 inputs); fp16/bf16 inputs are accumulated in float32. Differentiable w.r.t.
    ``z1`` and ``z2`` only. ``impl``: ``"ext"`` the C++/CUDA op, ``"torch"`` the pure-PyTorch reference,
    ``"auto"`` the op when it is built and passed its self-check on this device and dtype, else the
    reference (logged once). On CUDA, fp16/bf16 inputs are multiplied on tensor cores (fp32 accumulation
    and results) and fp32 products follow torch's matmul precision (TF32 if allowed), like a matmul.
    """
    if _use_extension(impl, z1):
        return _op_loss(z1.contiguous(), z2.contiguous(), on_weight, off_weight, eps)
    return bt_xcorr_loss_reference(z1, z2, on_weight, off_weight, eps)


def bt_xcorr_loss_global(
    z1: Tensor,
    z2: Tensor,
    on_weight: Tensor,
    off_weight: Tensor,
    eps: float = 1e-5,
    group: ProcessGroup | None = None,
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


def _op_loss(z1: Tensor, z2: Tensor, on_weight: Tensor, off_weight: Tensor, eps: float) -> Tensor:
    # outside the caller's autocast, which would hand the op's own matmuls bf16/fp16 products of fp32
    # inputs ("bt_xcorr_layer_loss" not implemented for 'BFloat16'); the op picks its precision itself
    with torch.autocast(z1.device.type, enabled=False):
        return torch.ops.ilm_dist.bt_xcorr_loss.default(z1, z2, on_weight, off_weight, eps)[0]


def _use_extension(impl: Impl, z1: Tensor) -> bool:
    if impl == "torch":
        return False
    if impl not in ("auto", "ext"):
        raise ValueError(f"bt_xcorr_loss: impl must be 'auto', 'ext' or 'torch', got {impl!r}")
    if not extension_available():
        if impl == "ext":
            raise RuntimeError(
                f"bt_xcorr_loss(impl='ext'): the ilm_dist._C extension is not available ({LOAD_ERROR}); "
                "build it with `pip install --no-build-isolation -e .`"
            )
        _log_fallback()
        return False
    if torch.compiler.is_compiling():  # traced: the check ran (or runs) eagerly; only its verdict is read
        return _SELF_CHECKS.get(_check_key(z1.device, z1.dtype)) is None
    failure = check_extension(z1.device, z1.dtype)
    if failure is None:
        return True
    if impl == "ext":
        raise RuntimeError(f"bt_xcorr_loss(impl='ext'): {failure}")
    return False


@functools.cache
def _log_fallback() -> None:
    logger.warning(
        "ilm_dist._C extension not available (%s); bt_xcorr_loss uses the PyTorch reference", LOAD_ERROR
    )


# --------------------------------------------------------------------------- self-check

# (L, N, D) of the self-check: the Gram form (2N <= D) and the D x D form, D not a multiple of 32; each once
# with N small enough for one slice of the batch axis and once with N = 130, which the CUDA column kernels
# cut into uneven slices (44, 44, 42 rows: csrc/xcorr_cuda.cu, row_parts).
_CHECK_SHAPES = ((2, 12, 40), (2, 40, 20), (1, 130, 264), (1, 130, 24))
_CHECKED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# Largest relative error (Frobenius norm, against float64 on the same rounded inputs) of the loss and of
# each gradient. Loose enough for the rounding of each precision, far below a kernel bug's O(1) errors.
_TOLERANCE = {
    torch.float64: 1e-9,
    torch.float32: 1e-4,
    "tf32": 1e-2,
    torch.float16: 3e-2,
    torch.bfloat16: 3e-2,
}
_SELF_CHECKS: dict[tuple[str, torch.dtype], str | None] = {}  # verdicts: None passed, else the failure


def _check_key(device: torch.device, dtype: torch.dtype) -> tuple[str, torch.dtype]:
    return str(device), dtype


def tf32_enabled(device: torch.device) -> bool:
    """Whether fp32 matmuls on ``device`` may run in TF32: torch >= 2.9's ``fp32_precision`` settings when one
    is set (reading the legacy flags then raises RuntimeError, "mix of the legacy and new APIs"), else the
    legacy ``allow_tf32`` / ``float32_matmul_precision``."""
    if device.type != "cuda":
        return False
    backends = torch.backends
    for precision in (
        getattr(backends.cuda.matmul, "fp32_precision", "none"),
        getattr(backends, "fp32_precision", "none"),
    ):
        if precision != "none":
            return precision == "tf32"
    with warnings.catch_warnings():  # allow_tf32 is deprecated in favour of fp32_precision in newer torch
        warnings.simplefilter("ignore")
        return bool(backends.cuda.matmul.allow_tf32) or torch.get_float32_matmul_precision() != "highest"


def check_extension(device: torch.device, dtype: torch.dtype) -> str | None:
    """The op's self-check on ``device`` and ``dtype`` (run once, then cached): None if it passed, else why not.

    Forward and backward of both formulations on small random inputs, against the float64 reference; a
    failure is logged as a warning. Devices other than CPU/CUDA and unsupported dtypes are not checked
    (the op rejects them with its own error).
    """
    key = _check_key(device, dtype)
    if key not in _SELF_CHECKS:
        if device.type not in ("cpu", "cuda") or dtype not in _CHECKED_DTYPES:
            return None
        _SELF_CHECKS[key] = _run_self_check(torch.device(device), dtype)
        if _SELF_CHECKS[key] is not None:
            logger.warning("%s", _SELF_CHECKS[key])
    return _SELF_CHECKS[key]


def _run_self_check(device: torch.device, dtype: torch.dtype) -> str | None:
    tf32 = dtype == torch.float32 and tf32_enabled(device)
    tolerance = _TOLERANCE["tf32" if tf32 else dtype]
    where = f"{device} {str(dtype).removeprefix('torch.')}" + (" (TF32 matmuls)" if tf32 else "")
    fallback = "this device and dtype use the PyTorch reference instead (bt_xcorr_loss impl='auto')"
    try:
        with torch.enable_grad(), torch.autocast(device.type, enabled=False):
            for seed, shape in enumerate(_CHECK_SHAPES):
                errors = _check_errors(shape, device, dtype, seed)
                name, error = max(errors.items(), key=lambda item: item[1])
                if not error <= tolerance:  # also catches NaN
                    return (
                        f"bt_xcorr_loss self-check failed on {where}: {name} relative error {error:.3g} > "
                        f"{tolerance:g} against the float64 reference at [L, N, D] = {list(shape)}; {fallback}"
                    )
    except RuntimeError as err:
        return f"bt_xcorr_loss self-check failed on {where}: the op raised {type(err).__name__}: {err}; {fallback}"
    logger.debug("bt_xcorr_loss self-check passed on %s", where)
    return None


def _check_errors(shape: tuple[int, int, int], device: torch.device, dtype: torch.dtype, seed: int) -> dict:
    """Relative errors of the op's loss and gradients against float64, on correlated random views."""
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5
    z2 = 0.6 * z1 + torch.randn(shape, generator=g, dtype=torch.float64)
    weights = (torch.rand(shape[0], generator=g) + 0.5, torch.rand(shape[0], generator=g) * 0.2)
    upstream = torch.rand(shape[0], generator=g) + 0.5
    z1, z2 = z1.to(dtype), z2.to(dtype)  # the reference sees the same rounded inputs
    ours = _loss_and_grads(_op_loss, z1.to(device), z2.to(device), weights, upstream)
    ref = _loss_and_grads(bt_xcorr_loss_reference, z1.double(), z2.double(), weights, upstream)
    parts = ("forward", "backward dz1", "backward dz2")
    return {part: ((x - r).norm() / r.norm()).item() for part, x, r in zip(parts, ours, ref, strict=True)}


def _loss_and_grads(fn, z1: Tensor, z2: Tensor, weights: tuple[Tensor, Tensor], upstream: Tensor) -> list:
    """fn's loss and the gradients of (loss * upstream).sum(), in float64 on the CPU."""
    z1, z2 = z1.requires_grad_(), z2.requires_grad_()
    wdtype = torch.float64 if z1.dtype == torch.float64 else torch.float32
    on, off = (w.to(z1.device, wdtype) for w in weights)
    loss = fn(z1, z2, on, off, 1e-5)
    grads = torch.autograd.grad((loss * upstream.to(loss.device, loss.dtype)).sum(), (z1, z2))
    return [t.detach().double().cpu() for t in (loss, *grads)]


# --------------------------------------------------------------------------- op registrations


def _fake_loss(
    z1: Tensor, z2: Tensor, on_weight: Tensor, off_weight: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    torch._check(z1.dim() == 3, lambda: f"bt_xcorr_loss: z1 must be a 3-D [L, N, D] tensor, got {z1.shape}")
    torch._check(
        z1.shape == z2.shape, lambda: f"bt_xcorr_loss: z1 and z2 shapes differ: {z1.shape}, {z2.shape}"
    )
    layers, n, d = z1.shape
    dtype = compute_dtype(z1.dtype)
    xcorr = (layers, 0, 0) if 2 * n <= d else (layers, d, d)  # csrc/xcorr.h: use_gram
    return z1.new_empty((layers,), dtype=dtype), z1.new_empty(xcorr, dtype=dtype)


def _fake_backward(
    grad_loss: Tensor,
    z1: Tensor,
    z2: Tensor,
    xcorr: Tensor | None,
    on_weight: Tensor,
    off_weight: Tensor,
    eps: float,
) -> tuple[Tensor, Tensor]:
    return torch.empty_like(z1), torch.empty_like(z2)


def _setup_context(ctx, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:
    z1, z2, on_weight, off_weight, eps = inputs
    if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
        raise NotImplementedError("bt_xcorr_loss is not differentiable w.r.t. on_weight/off_weight")
    xcorr = output[1]
    ctx.mark_non_differentiable(xcorr)
    ctx.set_materialize_grads(False)  # no zero [L, D, D] gradient for xcorr each step: _backward ignores it
    ctx.save_for_backward(z1, z2, xcorr, on_weight, off_weight)
    ctx.eps = eps


def _backward(ctx, grad_loss: Tensor, _grad_xcorr: Tensor | None) -> tuple[Tensor | None, ...]:
    if grad_loss is None:  # not materialised (_setup_context): only xcorr, which has no gradient, was used
        return None, None, None, None, None
    z1, z2, xcorr, on_weight, off_weight = ctx.saved_tensors
    with torch.autocast(z1.device.type, enabled=False):  # as the forward (_op_loss)
        dz1, dz2 = torch.ops.ilm_dist.bt_xcorr_loss_backward.default(
            grad_loss.contiguous(), z1, z2, xcorr, on_weight, off_weight, ctx.eps
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
