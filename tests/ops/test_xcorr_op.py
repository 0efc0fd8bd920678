"""The ilm_dist::bt_xcorr_loss C++/CUDA op against the float64 pure-PyTorch reference."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import Tensor

from ilm_dist.ops import bt_xcorr_loss, bt_xcorr_loss_reference, check_extension, extension_available
from ilm_dist.ops import xcorr as xcorr_module
from ilm_dist.ops.reference import batch_standardize
from ilm_dist.ops.xcorr import tf32_enabled

needs_ext = pytest.mark.skipif(not extension_available(), reason="ilm_dist._C extension not built")
cuda_only = pytest.mark.skipif(not (torch.cuda.is_available() and extension_available()), reason="needs CUDA")
DEVICES = ["cpu", pytest.param("cuda", marks=cuda_only)]
REPO = Path(__file__).resolve().parents[2]
EPS = 1e-5

# (L, N, D): Gram form (2N <= D; the boundary 2N = D too), D x D form (2N > D), several reduction chunks
# (N^2 > 16384), D not a multiple of 32, N = 2.
SHAPES = [
    (1, 8, 40),
    (2, 20, 40),
    (2, 16, 100),
    (3, 50, 40),
    (4, 33, 70),
    (2, 130, 24),
    (4, 21, 33),
    (1, 150, 320),
    (1, 2, 5),
]


def make_inputs(shape: tuple[int, int, int], dtype=torch.float32, device="cpu", seed=0) -> list[Tensor]:
    """Correlated views z1, z2 with non-zero means, and per-layer weights (float32 unless float64)."""
    g = torch.Generator().manual_seed(seed)
    L = shape[0]
    z1 = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5
    z2 = 0.7 * z1 + torch.randn(shape, generator=g, dtype=torch.float64) - 1
    on = torch.rand(L, generator=g, dtype=torch.float64) + 0.5
    off = torch.rand(L, generator=g, dtype=torch.float64) * 0.1
    wdtype = torch.float64 if dtype == torch.float64 else torch.float32
    return [z1.to(device, dtype), z2.to(device, dtype), on.to(device, wdtype), off.to(device, wdtype)]


def ref64(z1: Tensor, z2: Tensor, on: Tensor, off: Tensor) -> Tensor:
    return bt_xcorr_loss_reference(z1.double(), z2.double(), on.double(), off.double(), EPS)


def loss_and_grads(fn, z1: Tensor, z2: Tensor, on: Tensor, off: Tensor, upstream: Tensor):
    """fn's loss and the gradients of (loss * upstream).sum() w.r.t. z1, z2."""
    z1, z2 = z1.detach().requires_grad_(), z2.detach().requires_grad_()
    loss = fn(z1, z2, on, off)
    g1, g2 = torch.autograd.grad((loss * upstream.to(loss.dtype)).sum(), (z1, z2))
    return loss.detach(), g1, g2


def ext(z1: Tensor, z2: Tensor, on: Tensor, off: Tensor) -> Tensor:
    return bt_xcorr_loss(z1, z2, on, off, EPS, impl="ext")


def plain_loss(z1: Tensor, z2: Tensor, on: Tensor, off: Tensor) -> Tensor:
    """The loss with every step in the inputs' dtype, as plain PyTorch computes it in bf16."""
    a, b = batch_standardize(z1, EPS), batch_standardize(z2, EPS)
    c = a.transpose(-1, -2) @ b / z1.shape[-2]
    diag = torch.diagonal(c, dim1=-2, dim2=-1)
    return on.to(c.dtype) * (diag - 1).pow(2).sum(-1) + off.to(c.dtype) * (
        c.pow(2).sum((-1, -2)) - diag.pow(2).sum(-1)
    )


def upstream_weights(count: int, device: str | torch.device = "cpu", dtype=torch.float64) -> Tensor:
    """Seeded per-layer upstream gradients in [0.5, 1.5): a draw from the global generator made the
    N = 2 check depend on what ran before it in the process (it failed for 4 of 40 draws)."""
    return (torch.rand(count, generator=torch.Generator().manual_seed(1), dtype=dtype) + 0.5).to(device)


def rel_err(x: Tensor, ref: Tensor) -> float:
    return ((x.double().cpu() - ref.double().cpu()).norm() / ref.double().norm()).item()


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_backward_match_float64_reference(shape, device):
    z1, z2, on, off = make_inputs(shape, device=device)
    upstream = upstream_weights(shape[0], device)
    got = loss_and_grads(ext, z1, z2, on, off, upstream)
    truth = loss_and_grads(ref64, z1.double(), z2.double(), on, off, upstream)
    fp32 = loss_and_grads(bt_xcorr_loss_reference, z1, z2, on, off, upstream)
    assert got[0].dtype == torch.float32 and got[0].shape == (shape[0],)
    assert got[1].dtype == z1.dtype and got[1].shape == z1.shape
    torch.testing.assert_close(got[0].double(), truth[0], rtol=2e-5, atol=1e-5)
    for ours, ref, plain in zip(
        got[1:], truth[1:], fp32[1:], strict=True
    ):  # N = 2 is ill-conditioned in fp32
        assert rel_err(ours, ref) < max(1e-4, 2 * rel_err(plain, ref))


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("shape", "form"),
    [((2, 8, 40), "gram"), ((1, 10, 20), "gram"), ((1, 10, 19), "xcorr"), ((3, 40, 24), "xcorr")],
)
def test_formulation_by_cost_and_the_saved_cross_correlation(shape, form, device):
    """Gram form iff 2N <= D (xcorr empty); else xcorr = N C, and the backward gives the same with or without it."""
    z1, z2, on, off = make_inputs(shape, device=device)
    _, xcorr = torch.ops.ilm_dist.bt_xcorr_loss(z1, z2, on, off, EPS)
    L = shape[0]
    if form == "gram":
        assert xcorr.shape == (L, 0, 0)
    else:
        a, b = batch_standardize(z1.double(), EPS), batch_standardize(z2.double(), EPS)
        torch.testing.assert_close(xcorr.double(), a.transpose(1, 2) @ b, rtol=1e-5, atol=1e-4)
    grad = torch.rand(L, device=device)
    saved = torch.ops.ilm_dist.bt_xcorr_loss_backward(grad, z1, z2, xcorr, on, off, EPS)
    recomputed = torch.ops.ilm_dist.bt_xcorr_loss_backward(grad, z1, z2, None, on, off, EPS)
    for x, y in zip(saved, recomputed, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(2, 6, 10), (1, 4, 12), (2, 9, 5)])
def test_gradcheck_float64(shape, device):
    z1, z2, on, off = make_inputs(shape, torch.float64, device)
    z1.requires_grad_()
    z2.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: ext(a, b, on, off), (z1, z2))


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(2, 8, 40), (3, 40, 24)])
def test_opcheck(shape, device):
    z1, z2, on, off = make_inputs(shape, device=device)
    torch.library.opcheck(torch.ops.ilm_dist.bt_xcorr_loss.default, (z1, z2, on, off, EPS))
    args = (z1.clone().requires_grad_(), z2.clone().requires_grad_(), on, off, EPS)
    torch.library.opcheck(torch.ops.ilm_dist.bt_xcorr_loss.default, args)
    grad = torch.rand(shape[0], device=device)
    _, xcorr = torch.ops.ilm_dist.bt_xcorr_loss(z1, z2, on, off, EPS)
    for saved in (xcorr, None):
        backward_args = (grad, z1, z2, saved, on, off, EPS)
        torch.library.opcheck(torch.ops.ilm_dist.bt_xcorr_loss_backward.default, backward_args)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(4, 64, 96), (2, 96, 48)])
def test_low_precision_inputs_accumulate_in_fp32(shape, dtype, device):
    """Against float64 on the same rounded inputs: within 2x of plain PyTorch in that dtype, and near fp32.

    CPU products are fp32 (the loss then matches fp32 to 1e-5); CUDA multiplies the fp16/bf16-rounded
    standardised inputs on tensor cores, which costs the loss about 1e-4 (bf16) and 1e-5 (fp16).
    """
    z1, z2, on, off = make_inputs(shape, dtype, device)
    upstream = torch.ones(shape[0], dtype=torch.float64, device=device)
    truth = loss_and_grads(ref64, z1.double(), z2.double(), on, off, upstream)
    got = loss_and_grads(ext, z1, z2, on, off, upstream)
    plain = loss_and_grads(plain_loss, z1, z2, on.to(dtype), off.to(dtype), upstream)
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype
    for ours, theirs, ref in zip(got, plain, truth, strict=True):
        assert rel_err(ours, ref) <= 2 * rel_err(theirs, ref)
    loss_bound = 1e-5 if device == "cpu" else {torch.bfloat16: 1e-3, torch.float16: 1e-4}[dtype]
    assert rel_err(got[0], truth[0]) < loss_bound
    assert rel_err(got[1], truth[1]) < 1e-2 and rel_err(got[2], truth[2]) < 1e-2  # gradients rounded to dtype


@needs_ext
def test_torch_compile_fullgraph():
    z1, z2, on, off = make_inputs((2, 12, 40))

    def step(a: Tensor, b: Tensor) -> Tensor:
        return bt_xcorr_loss(a, b, on, off, EPS, impl="ext").sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    loss = compiled(a, b)
    loss.backward()
    a_ref, b_ref = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    loss_ref = step(a_ref, b_ref)
    loss_ref.backward()
    torch.testing.assert_close(loss, loss_ref)
    torch.testing.assert_close(a.grad, a_ref.grad)
    torch.testing.assert_close(b.grad, b_ref.grad)


def _bad_inputs() -> list[tuple[str, tuple, str]]:
    z1, z2, on, off = make_inputs((2, 8, 12))
    return [
        ("2-D", (z1[0], z2[0], on, off, EPS), r"z1 must be a 3-D \[L, N, D\] tensor, got shape \[8, 12\]"),
        ("shapes", (z1, z2[:, :4], on, off, EPS), r"z1 and z2 must have the same shape"),
        ("empty", (z1[:, :0], z2[:, :0], on, off, EPS), r"must be non-empty"),
        (
            "int",
            (z1.int(), z2.int(), on, off, EPS),
            r"z1 must be float32, float64, float16 or bfloat16, got Int",
        ),
        (
            "dtypes",
            (z1, z2.double(), on, off, EPS),
            r"z1 and z2 must have the same dtype, got Float and Double",
        ),
        (
            "strides",
            (z1.transpose(0, 1).contiguous().transpose(0, 1), z2, on, off, EPS),
            r"must be contiguous",
        ),
        (
            "weights",
            (z1, z2, on[:1], off, EPS),
            r"on_weight must be a 1-D tensor with one weight per layer \(2\)",
        ),
        ("int weight", (z1, z2, on, off.int(), EPS), r"off_weight must be a floating-point tensor"),
        ("eps", (z1, z2, on, off, -1.0), r"eps must be finite and >= 0"),
    ]


@needs_ext
@pytest.mark.parametrize(
    ("args", "message"), [case[1:] for case in _bad_inputs()], ids=[c[0] for c in _bad_inputs()]
)
def test_input_validation(args, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.ilm_dist.bt_xcorr_loss(*args)


@needs_ext
def test_backward_op_validates_grad_and_xcorr_shapes():
    z1, z2, on, off = make_inputs((2, 8, 12))
    with pytest.raises(RuntimeError, match=r"grad_loss must have shape \[L\] = \[2\]"):
        torch.ops.ilm_dist.bt_xcorr_loss_backward(torch.ones(3), z1, z2, None, on, off, EPS)
    with pytest.raises(RuntimeError, match=r"xcorr must be the forward's \[L, D, D\] = \[2, 12, 12\] output"):
        torch.ops.ilm_dist.bt_xcorr_loss_backward(torch.ones(2), z1, z2, torch.ones(2, 3, 3), on, off, EPS)


@needs_ext
def test_weights_are_not_differentiable():
    z1, z2, on, off = make_inputs((2, 8, 12))
    with pytest.raises(NotImplementedError, match=r"not differentiable w\.r\.t\. on_weight/off_weight"):
        ext(z1, z2, on.requires_grad_(), off)


@cuda_only
def test_cuda_device_mismatch():
    z1, z2, on, off = make_inputs((2, 8, 12), device="cuda")
    with pytest.raises(RuntimeError, match="z1 and z2 must be on the same device"):
        torch.ops.ilm_dist.bt_xcorr_loss(z1, z2.cpu(), on, off, EPS)
    with pytest.raises(RuntimeError, match="on_weight must be on the same device as z1"):
        torch.ops.ilm_dist.bt_xcorr_loss(z1, z2, on.cpu(), off, EPS)


@cuda_only
def test_cuda_runs_on_the_current_stream():
    z1, z2, on, off = make_inputs((3, 40, 200), device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        loss, g1, g2 = loss_and_grads(ext, z1, z2, on, off, torch.ones(3, device="cuda"))
    stream.synchronize()
    expected = loss_and_grads(ext, *(t.cpu() for t in (z1, z2, on, off)), torch.ones(3))
    for got, want in zip((loss, g1, g2), expected, strict=True):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-5)


def test_torch_impl_is_the_reference():
    z1, z2, on, off = make_inputs((2, 8, 12))
    torch.testing.assert_close(
        bt_xcorr_loss(z1, z2, on, off, impl="torch"), bt_xcorr_loss_reference(z1, z2, on, off)
    )
    with pytest.raises(ValueError, match="impl must be 'auto', 'ext' or 'torch'"):
        bt_xcorr_loss(z1, z2, on, off, impl="cuda")


@needs_ext
def test_extension_loads_in_a_fresh_interpreter():
    """Importing ilm_dist.ops first (before torch) must still load ilm_dist._C."""
    code = "import ilm_dist.ops as ops; assert ops.extension_available(), ops.xcorr.LOAD_ERROR"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.fixture
def no_extension(monkeypatch):
    monkeypatch.setattr(xcorr_module, "extension_available", lambda: False)
    xcorr_module._log_fallback.cache_clear()
    yield
    xcorr_module._log_fallback.cache_clear()


def test_auto_falls_back_with_one_log_line(no_extension, caplog):
    z1, z2, on, off = make_inputs((2, 8, 12))
    with caplog.at_level(logging.WARNING, logger="ilm_dist"):
        for _ in range(3):
            torch.testing.assert_close(
                bt_xcorr_loss(z1, z2, on, off), bt_xcorr_loss_reference(z1, z2, on, off)
            )
    assert len([r for r in caplog.records if "extension not available" in r.getMessage()]) == 1


def test_ext_impl_requires_the_extension(no_extension):
    z1, z2, on, off = make_inputs((2, 8, 12))
    with pytest.raises(RuntimeError, match=r"impl='ext'.*pip install --no-build-isolation -e \."):
        bt_xcorr_loss(z1, z2, on, off, impl="ext")


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    """The wrapper takes strided views (the op itself requires contiguous inputs); same loss and gradients."""
    L, n, d = 3, 24, 40
    g = torch.Generator().manual_seed(3)
    base1 = torch.randn(n, L, 2 * d, generator=g).to(device)
    base2 = 0.5 * base1 + torch.randn(n, L, 2 * d, generator=g).to(device)
    on, off = torch.ones(L, device=device), torch.full((L,), 0.05, device=device)
    view1, view2 = base1.transpose(0, 1)[..., ::2], base2.transpose(0, 1)[..., ::2]  # [L, N, D], strided
    assert not view1.is_contiguous()
    upstream = torch.ones(L, device=device)
    got = loss_and_grads(ext, view1, view2, on, off, upstream)
    want = loss_and_grads(ext, view1.contiguous(), view2.contiguous(), on, off, upstream)
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y)


# --------------------------------------------------------------------------- the op's self-check


@pytest.fixture
def fresh_self_checks():
    xcorr_module._SELF_CHECKS.clear()
    yield
    xcorr_module._SELF_CHECKS.clear()


@contextmanager
def cpu_kernel(name: str, kernel):
    """Replace the op's CPU kernel ``name`` in the dispatcher for the duration of the block."""
    library = torch.library.Library("ilm_dist", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
        library.impl(name, kernel, "CPU")
    try:
        yield
    finally:
        library._destroy()


def scaled_forward(z1: Tensor, z2: Tensor, on: Tensor, off: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """A broken forward kernel: the loss 5% too large (the xcorr output correct)."""
    n, d = z1.shape[1:]
    a, b = batch_standardize(z1.float(), eps), batch_standardize(z2.float(), eps)
    xcorr = a.transpose(1, 2) @ b if 2 * n >= d else z1.new_empty((z1.shape[0], 0, 0), dtype=torch.float32)
    return 1.05 * bt_xcorr_loss_reference(z1, z2, on, off, eps), xcorr


def sign_flipped_backward(grad, z1, z2, xcorr, on, off, eps) -> tuple[Tensor, Tensor]:
    """A broken backward kernel: dz2 with the wrong sign (dz1 correct)."""
    with torch.enable_grad():
        a, b = z1.detach().requires_grad_(), z2.detach().requires_grad_()
        loss = bt_xcorr_loss_reference(a, b, on, off, eps)
        da, db = torch.autograd.grad((loss * grad).sum(), (a, b))
    return da.to(z1.dtype), -db.to(z2.dtype)


def failing_forward(*args) -> tuple[Tensor, Tensor]:
    raise RuntimeError("kernel launch failed")


@needs_ext
def test_self_check_passes_once_per_device_and_dtype(fresh_self_checks, monkeypatch):
    runs = []
    real = xcorr_module._run_self_check
    monkeypatch.setattr(xcorr_module, "_run_self_check", lambda *a: runs.append(a) or real(*a))
    for dtype in (torch.float32, torch.float32, torch.float64, torch.bfloat16):
        z1, z2, on, off = make_inputs((2, 8, 12), dtype)
        torch.testing.assert_close(bt_xcorr_loss(z1, z2, on, off), bt_xcorr_loss(z1, z2, on, off, impl="ext"))
    assert runs == [(torch.device("cpu"), dtype) for dtype in (torch.float32, torch.float64, torch.bfloat16)]
    assert set(xcorr_module._SELF_CHECKS.values()) == {None}


@needs_ext
@pytest.mark.parametrize(
    ("name", "kernel", "error"),
    [
        ("bt_xcorr_loss", scaled_forward, r"forward relative error 0\.05 > 0\.0001"),
        ("bt_xcorr_loss_backward", sign_flipped_backward, r"backward dz2 relative error 2 > 0\.0001"),
        ("bt_xcorr_loss", failing_forward, r"the op raised RuntimeError: kernel launch failed"),
    ],
    ids=["forward", "backward", "raises"],
)
def test_a_broken_kernel_is_caught_and_replaced_by_the_reference(
    fresh_self_checks, caplog, name, kernel, error
):
    z1, z2, on, off = make_inputs((2, 8, 12))
    with cpu_kernel(name, kernel), caplog.at_level(logging.WARNING, logger="ilm_dist"):
        for _ in range(2):
            got = loss_and_grads(bt_xcorr_loss, z1, z2, on, off, torch.ones(2))
            want = loss_and_grads(bt_xcorr_loss_reference, z1, z2, on, off, torch.ones(2))
            for x, y in zip(got, want, strict=True):
                torch.testing.assert_close(x, y)
        with pytest.raises(RuntimeError, match=r"impl='ext'.*self-check failed on cpu float32: " + error):
            bt_xcorr_loss(z1, z2, on, off, impl="ext")
    assert check_extension(torch.device("cpu"), torch.float64) is None  # checked with the real kernel back
    assert check_extension(torch.device("cpu"), torch.float32) is not None  # the verdict is kept
    warnings_logged = [r.getMessage() for r in caplog.records if "self-check failed" in r.getMessage()]
    assert len(warnings_logged) == 1 and re.search(r"on cpu float32: " + error, warnings_logged[0])
    assert "use the PyTorch reference" in warnings_logged[0]
    xcorr_module._SELF_CHECKS.clear()  # the real kernel is back and passes
    assert check_extension(torch.device("cpu"), torch.float32) is None


# --------------------------------------------------------------------------- CUDA at production shapes


def cuda_rel_errors(shape, dtype, seed=0) -> list[float]:
    """Relative errors of the op's loss and gradients on CUDA against float64 on the same rounded inputs."""
    z1, z2, on, off = make_inputs(shape, dtype, "cuda", seed)
    upstream = upstream_weights(shape[0], "cuda")
    got = loss_and_grads(ext, z1, z2, on, off, upstream)
    truth = loss_and_grads(ref64, z1.double(), z2.double(), on, off, upstream)
    return [rel_err(x, y) for x, y in zip(got, truth, strict=True)]


@pytest.fixture
def tf32(request):
    """TF32 matmuls on or off for the test (torch's fp32 matmul precision), restored afterwards."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if request.param else "highest")
    yield request.param
    torch.set_float32_matmul_precision(before)


# (loss bound, gradient bound) against float64. fp16/bf16: the products take the standardised inputs (and,
# in the backward, a Gram matrix or N C) rounded to that dtype, and the gradients are returned in it. A
# float64 emulation of exactly those roundings gave at most, over the shapes tested here: bf16 loss 2.8e-4,
# gradients 1.9e-2 (N = 32, D = 2048; plain bf16 PyTorch: 4.5e-2); fp16 loss 2.5e-5, gradients 2.4e-3.
CUDA_BOUNDS = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (1e-3, 5e-2), torch.float16: (1e-4, 1e-2)}


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [32, 64, 256])
@pytest.mark.parametrize("tf32", [False], indirect=True)
def test_cuda_production_shapes(n, dtype, tf32):
    """L = 4 blocks, D = 2048 (the BT projector), per-GPU batches 32-256: the Gram form."""
    loss_bound, grad_bound = CUDA_BOUNDS[dtype]
    errors = cuda_rel_errors((4, n, 2048), dtype)
    assert errors[0] < loss_bound and max(errors[1:]) < grad_bound, errors


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 8192, 128), (1, 20000, 64), (4, 4096, 2048)])
@pytest.mark.parametrize("tf32", [False], indirect=True)
def test_cuda_batch_much_larger_than_features(shape, dtype, tf32):
    """N >> D (global-batch BT): the D x D form and many row slices (uneven ones at N = 20000)."""
    loss_bound, grad_bound = CUDA_BOUNDS[dtype]
    errors = cuda_rel_errors(shape, dtype)
    assert errors[0] < loss_bound and max(errors[1:]) < grad_bound, errors


@cuda_only
@pytest.mark.parametrize("tf32", [False, True], indirect=True)
@pytest.mark.parametrize("shape", [(4, 256, 2048), (2, 2048, 256)])
def test_cuda_tf32_on_and_off(shape, tf32):
    """fp32 products follow torch's matmul precision: fp32-exact without TF32, TF32-close with it."""
    errors = cuda_rel_errors(shape, torch.float32)
    bound = 1e-2 if tf32 else 1e-4
    assert max(errors) < bound, errors
    assert xcorr_module._tf32_enabled(torch.device("cuda")) == tf32


@cuda_only
def test_cuda_self_check_passes(fresh_self_checks):
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        assert check_extension(torch.device("cuda", torch.cuda.current_device()), dtype) is None


@needs_ext
def test_the_op_is_autocast_safe():
    """Under the caller's bf16 autocast, fp32 inputs give the fp32 result and gradients (the op's own
    matmuls once turned bf16 and it raised "bt_xcorr_layer_loss" not implemented for 'BFloat16')."""
    z1, z2, on, off = make_inputs((2, 20, 40))
    upstream = upstream_weights(2, dtype=torch.float32)
    plain = loss_and_grads(ext, z1, z2, on, off, upstream)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = loss_and_grads(ext, z1, z2, on, off, upstream)
    for got, want in zip(under, plain, strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize(("setting", "expected"), [("tf32", True), ("ieee", False)])
def test_the_tf32_probe_reads_the_new_precision_api(setting, expected):
    """torch >= 2.9: once TF32 is set through fp32_precision (as transformers does), reading the legacy flags
    raises RuntimeError; the probe reads the new setting instead (it raised before, outside any fallback)."""
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("torch without the fp32_precision API")
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = setting
        assert tf32_enabled(torch.device("cuda")) is expected
        assert tf32_enabled(torch.device("cpu")) is False
    finally:
        matmul.fp32_precision = before


def cuda_row_slices(n: int) -> list[int]:
    """Rows per slice of the batch axis in the CUDA column kernels: ``row_parts`` of csrc/xcorr_cuda.cu, with
    its constants read from that file."""
    source = (REPO / "csrc" / "xcorr_cuda.cu").read_text()
    per_part, max_parts = (
        int(re.search(rf"constexpr int64_t {name} = (\d+);", source).group(1))
        for name in ("kRowsPerPart", "kMaxRowParts")
    )
    count = min(max(-(-n // per_part), 1), max_parts)
    size = -(-n // count)
    return [min(size, n - start) for start in range(0, n, size)]


def test_the_self_check_covers_uneven_batch_slices_in_both_formulations():
    uneven = {
        "gram" if 2 * n <= d else "dxd"
        for _, n, d in xcorr_module._CHECK_SHAPES
        if len(set(cuda_row_slices(n))) > 1
    }
    assert uneven == {"gram", "dxd"}
    assert cuda_row_slices(130) == [44, 44, 42]


@needs_ext
def test_the_backward_gets_no_zero_gradient_for_the_cross_correlation():
    """The D x D form saves ``xcorr`` for the backward; autograd must not build a zero [L, D, D] gradient for
    that non-differentiable output every step."""
    z1, z2, on, off = make_inputs((2, 40, 20), torch.float32)
    z1, z2 = z1.requires_grad_(), z2.requires_grad_()
    loss = bt_xcorr_loss(z1, z2, on, off, impl="ext").sum()
    with torch.profiler.profile(record_shapes=True) as prof:
        loss.backward()
    zeroed = [e.input_shapes for e in prof.events() if e.name in ("aten::zero_", "aten::zeros_like")]
    assert [2, 20, 20] not in [shape[0] for shape in zeroed if shape], zeroed
    assert z1.grad is not None and z2.grad is not None
