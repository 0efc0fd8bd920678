"""ilm_dist.losses.precision: inside the engine's autocast, ``autocast_off`` makes the loss math fp32 again
(checked against an fp64 recomputation), and the autocast around it is back afterwards."""

import torch
import torch.nn.functional as F

from ilm_dist.config import LossConfig
from ilm_dist.losses.mse import MseIntermediateLoss
from ilm_dist.losses.precision import autocast_off

T = 0.07  # the InfoNCE temperature: logits near 1/T, where bf16's spacing is 0.06


def unit_rows(n: int, dim: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_logits_under_autocast_off_are_fp32_accurate_while_autocast_is_bf16():
    q, queue = unit_rows(16, 128, 0), unit_rows(256, 128, 1)
    reference = q.double() @ queue.double().T / T
    with torch.autocast("cpu", dtype=torch.bfloat16):
        coarse = q @ queue.T / T
        with autocast_off(q):
            fine = q @ queue.T / T
            assert not torch.is_autocast_enabled("cpu")
        assert torch.is_autocast_enabled("cpu")  # restored for the rest of the forward
    assert coarse.dtype == torch.bfloat16 and fine.dtype == torch.float32
    assert (coarse.double() - reference).abs().max() > 1e-3  # what autocast alone would cost
    torch.testing.assert_close(fine.double(), reference, rtol=0, atol=1e-5)


def test_autocast_off_targets_the_tensor_s_device_type():
    assert autocast_off(torch.zeros(1)).device == "cpu"


def test_mse_intermediate_loss_is_fp32_under_autocast():
    cfg = LossConfig(type="mse", blocks=[1, 3], weights=[0.5, 2.0])
    loss = MseIntermediateLoss(cfg, channels=[4, 8, 16, 32])
    gen = torch.Generator().manual_seed(2)
    q = [torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 16, 4, 4, generator=gen)]
    k = [x + 1e-3 * torch.randn(x.shape, generator=gen) for x in q]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss(q, k)
    reference = torch.stack([((a.double() - b.double()) ** 2).mean() for a, b in zip(q, k, strict=True)])
    reference = reference * torch.tensor([0.5, 2.0], dtype=torch.float64)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), reference, rtol=1e-5, atol=0)
