"""Intermediate Barlow Twins loss (Zbontar et al. 2021, as used by Kaku et al. 2021): global average pooling
of each block's output, one projector per block shared by both views, then the cross-correlation loss of
:func:`ilm_dist.ops.bt_xcorr_loss` with on-diagonal weight ``w_i * scale`` and off-diagonal weight
``w_i * scale * off_diag_weight``; with ``loss.bt.global_batch`` the statistics and C are over all ranks'
samples in training. In eval mode (the validation loss, whose batches each run on one rank) they are
always over the batch at hand."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from ilm_dist.errors import ConfigError
from ilm_dist.losses.intermediate import IntermediateLoss, register_intermediate_loss
from ilm_dist.losses.precision import autocast_off
from ilm_dist.ops import bt_xcorr_loss, bt_xcorr_loss_global


@dataclass
class BtLossConfig:
    proj_dims: list[int] = field(default_factory=lambda: [2048, 2048, 2048])  # Zbontar et al. 2021
    scale: float = 1 / 32  # official code's scale-loss, applied to both terms
    off_diag_weight: float = 1.0  # relative to the on-diagonal term (official: 1.0)
    eps: float = 1e-5  # BatchNorm1d(affine=False) epsilon
    impl: Literal["auto", "ext", "torch"] = "auto"
    global_batch: bool = False  # statistics and C over all ranks' samples (the official code: per GPU)

    def check(self) -> None:
        if not self.proj_dims or any(d <= 0 for d in self.proj_dims):
            raise ConfigError("loss.bt.proj_dims: needs at least one positive width")
        if self.eps <= 0:
            raise ConfigError("loss.bt.eps: must be positive")


def bt_projector(in_dim: int, dims: list[int]) -> nn.Sequential:
    """Barlow Twins projector: Linear(no bias) with BN + ReLU between, last layer plain."""
    layers: list[nn.Module] = []
    sizes = [in_dim, *dims]
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b, bias=False))
        if i < len(dims) - 1:
            layers += [nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


@register_intermediate_loss
class BtIntermediateLoss(IntermediateLoss):
    name = "bt"
    Config = BtLossConfig

    def __init__(self, cfg, channels: list[int]):
        super().__init__(cfg, channels)
        dims = self.options.proj_dims
        self.projectors = nn.ModuleList(bt_projector(channels[b - 1], dims) for b in self.blocks)

    def reduce(self, blocks: list[Tensor]) -> list[Tensor]:
        return [blocks[b - 1].mean(dim=(2, 3)) for b in self.blocks]

    def forward(self, q_reduced: list[Tensor], k_reduced: list[Tensor]) -> Tensor:
        z1 = torch.stack([proj(q) for proj, q in zip(self.projectors, q_reduced, strict=True)])
        z2 = torch.stack(
            [proj(k.to(q_reduced[0].dtype)) for proj, k in zip(self.projectors, k_reduced, strict=True)]
        )
        bt = self.options
        on_weight = self.weights * bt.scale
        off_weight = on_weight * bt.off_diag_weight
        loss = bt_xcorr_loss_global if bt.global_batch and self.training else bt_xcorr_loss
        with autocast_off(z1):  # the projectors ran under autocast; the loss accumulates in fp32
            return loss(z1, z2, on_weight, off_weight, eps=bt.eps, impl=bt.impl)

    def comm_bytes(self, batch: int, world: int, itemsize: int) -> float:
        """With ``global_batch``: the forward all-gather of both views' projections of every block."""
        if not self.options.global_batch:
            return 0.0
        ring = (world - 1) / world
        return 2 * ring * world * batch * len(self.blocks) * self.options.proj_dims[-1] * itemsize
