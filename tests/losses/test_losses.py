"""Loss terms against direct float64 formulas."""

import numpy as np
import pytest
import torch

from ilm_dist.config import LossConfig, load_config
from ilm_dist.losses.barlow_twins import BtIntermediateLoss
from ilm_dist.losses.contrastive import info_nce, moco_logits
from ilm_dist.losses.mse import MseIntermediateLoss
from ilm_dist.model.moco import MoCoILM
from ilm_dist.ops.reference import bt_xcorr_loss_reference

rng = np.random.default_rng(0)


def unit(rows, dim):
    x = rng.normal(size=(rows, dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_info_nce_matches_formula():
    q, k, queue, t = unit(6, 16), unit(6, 16), unit(40, 16), 0.2
    expected = np.mean(
        [
            -np.log(np.exp(q[i] @ k[i] / t) / (np.exp(q[i] @ k[i] / t) + np.exp(queue @ q[i] / t).sum()))
            for i in range(6)
        ]
    )
    got = info_nce(moco_logits(*(torch.tensor(a) for a in (q, k, queue)), t))
    assert got.item() == pytest.approx(expected, rel=1e-5)


def block_mean(x, out):
    """Average pooling by reshaping: the adaptive pool when the size divides evenly."""
    b, c, h, w = x.shape
    return x.reshape(b, c, out, h // out, out, w // out).mean(axis=(3, 5))


def test_mse_matches_formula():
    cfg = LossConfig(type="mse", blocks=[1, 3, 4], weights=[0.25, 0.5, 1.0])
    cfg.mse.pool_sizes = [4, 16, 2, 1]
    shapes = [(3, 4, 16, 16), (3, 8, 8, 8), (3, 8, 8, 8), (3, 16, 4, 4)]
    q = [rng.normal(size=s) for s in shapes]
    k = [rng.normal(size=s) for s in shapes]
    loss = MseIntermediateLoss(cfg, channels=[4, 8, 8, 16]).double()
    got = loss(loss.reduce([torch.tensor(a) for a in q]), loss.reduce([torch.tensor(a) for a in k]))
    expected = [
        w * np.mean((block_mean(q[b - 1], p) - block_mean(k[b - 1], p)) ** 2)
        for b, w, p in zip([1, 3, 4], [0.25, 0.5, 1.0], [4, 2, 1], strict=True)
    ]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)


def bt_formula(z1, z2, on_w, off_w, eps):
    """Barlow Twins with explicit loops over the cross-correlation entries (float64)."""
    n, d = z1.shape
    a = (z1 - z1.mean(0)) / np.sqrt(z1.var(0) + eps)
    b = (z2 - z2.mean(0)) / np.sqrt(z2.var(0) + eps)
    total = 0.0
    for i in range(d):
        for j in range(d):
            c = (a[:, i] * b[:, j]).sum() / n
            total += on_w * (c - 1) ** 2 if i == j else off_w * c**2
    return total


@pytest.mark.parametrize(("n", "d"), [(5, 12), (16, 7)])
def test_bt_reference_matches_formula(n, d):
    z1, z2 = rng.normal(size=(3, n, d)), rng.normal(size=(3, n, d))
    on, off = np.array([1.0, 0.5, 2e-3]), np.array([0.1, 1.0, 5e-5])
    got = bt_xcorr_loss_reference(
        torch.tensor(z1), torch.tensor(z2), torch.tensor(on), torch.tensor(off), eps=1e-5
    )
    expected = [bt_formula(z1[i], z2[i], on[i], off[i], 1e-5) for i in range(3)]
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=1e-5)


def test_bt_loss_is_the_official_per_block_computation():
    """Shared projector per block, BatchNorm1d(affine=False), lambda * scale on both terms."""
    cfg = LossConfig(type="bt", blocks=[2, 4], weights=[5e-5, 1e-4])
    cfg.bt.proj_dims, cfg.bt.off_diag_weight, cfg.bt.impl = [32, 24], 0.5, "torch"
    loss = BtIntermediateLoss(cfg, channels=[8, 16, 32, 64]).double().train()
    q = [torch.randn(10, c, dtype=torch.float64) for c in (16, 64)]
    k = [torch.randn(10, c, dtype=torch.float64) for c in (16, 64)]
    got = loss(q, k)
    bn = torch.nn.BatchNorm1d(24, affine=False).double()
    for i, (proj, w) in enumerate(zip(loss.projectors, [5e-5, 1e-4], strict=True)):
        c = (bn(proj(q[i])).T @ bn(proj(k[i]))) / 10
        on = (torch.diagonal(c) - 1).pow(2).sum()
        off = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
        expected = w * cfg.bt.scale * on + w * cfg.bt.scale * 0.5 * off
        assert got[i].item() == pytest.approx(expected.item(), rel=1e-7)
    assert [type(m).__name__ for m in loss.projectors[0]] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert loss.projectors[0][0].bias is None


@pytest.mark.parametrize("kind", ["none", "mse", "bt"])
def test_total_is_moco_plus_weighted_blocks(kind):
    cfg = load_config(
        "configs/demo.yaml", [f"loss.type={kind}", "loss.bt.impl=torch", "loss.bt.proj_dims=[64]"]
    )
    model = MoCoILM(cfg.model, cfg.moco, cfg.loss).train()
    images = torch.randn(4, 3, 64, 64)
    keys = model.key_features(model.encoder, torch.randn(4, 3, 64, 64))
    terms = model(images, keys, torch.nn.functional.normalize(torch.randn(32, 128), dim=1))
    blocks = [v for n, v in terms.items() if n.startswith(kind)]
    assert len(blocks) == (0 if kind == "none" else 4)
    assert terms["loss"].item() == pytest.approx(
        (terms["moco"] + sum(blocks, torch.tensor(0.0))).item(), rel=1e-6
    )
    assert list(terms) == model.term_names()
