"""Intermediate MSE loss (Kaku et al. 2021): adaptive average pooling of each block's output (16x16 for
blocks 1-2, 4x4 for blocks 3-4 in the official code) to soften the spatial mismatch that crops and
rotations create, then the weighted mean squared error between the two views' pooled maps."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ilm_dist.errors import ConfigError
from ilm_dist.losses.intermediate import IntermediateLoss, register_intermediate_loss
from ilm_dist.losses.precision import autocast_off


@dataclass
class MseLossConfig:
    pool_sizes: list[int] = field(default_factory=lambda: [16, 16, 4, 4])  # per block 1..4 (official code)

    def check(self) -> None:
        if len(self.pool_sizes) != 4 or any(p <= 0 for p in self.pool_sizes):
            raise ConfigError("loss.mse.pool_sizes: needs 4 positive sizes, one per block 1..4")


@register_intermediate_loss
class MseIntermediateLoss(IntermediateLoss):
    name = "mse"
    Config = MseLossConfig

    def __init__(self, cfg, channels: list[int]):
        super().__init__(cfg, channels)
        self.pool_sizes = [self.options.pool_sizes[b - 1] for b in self.blocks]

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
