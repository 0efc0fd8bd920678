"""Losses between the query and key encoders' intermediate block outputs (Kaku et al. 2021).

Both forms compare the query encoder's block ``i`` output for view 1 with the key (momentum)
encoder's block ``i`` output for view 2; no gradient flows into the key encoder.

- MSE: adaptive average pooling (16x16 for blocks 1-2, 4x4 for blocks 3-4 in the official code)
  to soften the spatial mismatch that crops and rotations create, then weighted MSE.
- Barlow Twins (Zbontar et al. 2021): global average pooling, one projector per block shared by
  both views, then the cross-correlation loss of :func:`ilm_dist.ops.bt_xcorr_loss` with
  on-diagonal weight ``w_i * scale`` and off-diagonal weight ``w_i * scale * off_diag_weight``;
  with ``loss.bt.global_batch`` the statistics and C are over all ranks' samples.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ilm_dist.config import LossConfig
from ilm_dist.losses.precision import autocast_off
from ilm_dist.ops import bt_xcorr_loss, bt_xcorr_loss_global


class IntermediateLoss(nn.Module):
    """Base: ``reduce`` shrinks block outputs (also applied to keys before any gather); ``forward`` scores them."""

    def __init__(self, cfg: LossConfig):
        super().__init__()
        self.blocks = list(cfg.blocks)
        self.register_buffer("weights", torch.tensor(cfg.weights, dtype=torch.float32), persistent=False)

    def term_names(self) -> list[str]:
        return [f"{self.kind}_block{b}" for b in self.blocks]

    def reduce(self, blocks: list[Tensor]) -> list[Tensor]:
        raise NotImplementedError

    def forward(self, q_reduced: list[Tensor], k_reduced: list[Tensor]) -> Tensor:
        """Weighted per-block losses ``[len(blocks)]``; their sum is added to InfoNCE."""
        raise NotImplementedError


class MseIntermediateLoss(IntermediateLoss):
    kind = "mse"

    def __init__(self, cfg: LossConfig):
        super().__init__(cfg)
        self.pool_sizes = [cfg.mse.pool_sizes[b - 1] for b in self.blocks]

    def reduce(self, blocks: list[Tensor]) -> list[Tensor]:
        return [
            F.adaptive_avg_pool2d(blocks[b - 1], size)
            for b, size in zip(self.blocks, self.pool_sizes, strict=True)
        ]

    def forward(self, q_reduced: list[Tensor], k_reduced: list[Tensor]) -> Tensor:
        with autocast_off(q_reduced[0]):
            losses = torch.stack(
                [F.mse_loss(q.float(), k.float()) for q, k in zip(q_reduced, k_reduced, strict=True)]
            )
            return self.weights * losses


def bt_projector(in_dim: int, dims: list[int]) -> nn.Sequential:
    """Barlow Twins projector: Linear(no bias) with BN + ReLU between, last layer plain."""
    layers: list[nn.Module] = []
    sizes = [in_dim, *dims]
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b, bias=False))
        if i < len(dims) - 1:
            layers += [nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class BtIntermediateLoss(IntermediateLoss):
    kind = "bt"

    def __init__(self, cfg: LossConfig, channels: list[int]):
        super().__init__(cfg)
        self.projectors = nn.ModuleList(bt_projector(channels[b - 1], cfg.bt.proj_dims) for b in self.blocks)
        self.bt = cfg.bt

    def reduce(self, blocks: list[Tensor]) -> list[Tensor]:
        return [blocks[b - 1].mean(dim=(2, 3)) for b in self.blocks]

    def forward(self, q_reduced: list[Tensor], k_reduced: list[Tensor]) -> Tensor:
        z1 = torch.stack([proj(q) for proj, q in zip(self.projectors, q_reduced, strict=True)])
        z2 = torch.stack(
            [proj(k.to(q_reduced[0].dtype)) for proj, k in zip(self.projectors, k_reduced, strict=True)]
        )
        on_weight = self.weights * self.bt.scale
        off_weight = on_weight * self.bt.off_diag_weight
        loss = bt_xcorr_loss_global if self.bt.global_batch else bt_xcorr_loss
        with autocast_off(z1):  # the projectors ran under autocast; the loss accumulates in fp32
            return loss(z1, z2, on_weight, off_weight, eps=self.bt.eps, impl=self.bt.impl)


def build_intermediate_loss(cfg: LossConfig, channels: list[int]) -> IntermediateLoss | None:
    if cfg.type == "mse":
        return MseIntermediateLoss(cfg)
    if cfg.type == "bt":
        return BtIntermediateLoss(cfg, channels)
    return None
