"""The ilm_dist::bt_xcorr_loss C++/CUDA op against the float64 pure-PyTorch reference."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch
from torch import Tensor

from ilm_dist.ops import bt_xcorr_loss, bt_xcorr_loss_reference, extension_available
from ilm_dist.ops import xcorr as xcorr_module
from ilm_dist.ops.reference import batch_standardize

needs_ext = pytest.mark.skipif(not extension_available(), reason="ilm_dist._C extension not built")
cuda_only = pytest.mark.skipif(not (torch.cuda.is_available() and extension_available()), reason="needs CUDA")
DEVICES = ["cpu", pytest.param("cuda", marks=cuda_only)]
EPS = 1e-5

# (L, N, D): Gram form in forward and backward (2N < D), D x D form in both (4N >= 3D), Gram only in the
# backward (D/2 <= N < 3D/4), several reduction chunks (N^2 > 16384), D not a multiple of 32, N = 2.
SHAPES = [
    (1, 8, 40),
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


def rel_err(x: Tensor, ref: Tensor) -> float:
    return ((x.double().cpu() - ref.double().cpu()).norm() / ref.double().norm()).item()


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_backward_match_float64_reference(shape, device):
    z1, z2, on, off = make_inputs(shape, device=device)
    upstream = torch.rand(shape[0], dtype=torch.float64, device=device) + 0.5
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
    torch.library.opcheck(torch.ops.ilm_dist.bt_xcorr_loss_backward.default, (grad, z1, z2, on, off, EPS))


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(4, 64, 96), (2, 96, 48)])
def test_low_precision_inputs_accumulate_in_fp32(shape, dtype, device):
    """Against float64 on the same rounded inputs: within 2x of plain PyTorch in that dtype, and near fp32."""
    z1, z2, on, off = make_inputs(shape, dtype, device)
    upstream = torch.ones(shape[0], dtype=torch.float64, device=device)
    truth = loss_and_grads(ref64, z1.double(), z2.double(), on, off, upstream)
    got = loss_and_grads(ext, z1, z2, on, off, upstream)
    plain = loss_and_grads(plain_loss, z1, z2, on.to(dtype), off.to(dtype), upstream)
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype
    for ours, theirs, ref in zip(got, plain, truth, strict=True):
        assert rel_err(ours, ref) <= 2 * rel_err(theirs, ref)
    assert rel_err(got[0], truth[0]) < 1e-5
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
def test_backward_op_validates_grad_shape():
    z1, z2, on, off = make_inputs((2, 8, 12))
    with pytest.raises(RuntimeError, match=r"grad_loss must have shape \[L\] = \[2\]"):
        torch.ops.ilm_dist.bt_xcorr_loss_backward(torch.ones(3), z1, z2, on, off, EPS)


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
