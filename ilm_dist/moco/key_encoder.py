"""The momentum (key) encoder: an fp32 EMA copy of the query encoder (He et al. 2020, Eq. 2).

It is kept outside the DeepSpeed engine, in fp32 even when the engine computes in bf16/fp16:
with m = 0.999 the per-step change (1 - m) * (q - k) is below bf16's resolution for most weights.
It averages the query's fp32 master weights: under the engine's ``torch_autocast`` mode the module's
weights are those masters (ZeRO 1/2: their all-gathered copies, bit for bit), and a 16-bit copy is
refused rather than silently averaged. The update is one fused multi-tensor ``lerp`` over all parameters.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class KeyEncoder(nn.Module):
    def __init__(self, query: nn.Module):
        super().__init__()
        self.encoder = copy.deepcopy(query).float()
        self.encoder.requires_grad_(False)

    @torch.no_grad()
    def update(self, query: nn.Module, momentum: float) -> None:
        """k <- m * k + (1 - m) * q for every parameter (buffers such as BN statistics stay the key's own)."""
        k_params = list(self.encoder.parameters())
        q_params = [p.detach() for p in query.parameters()]
        low = {str(p.dtype) for p in q_params if p.dtype != torch.float32}
        if low:
            raise TypeError(
                f"KeyEncoder.update: the query weights are {sorted(low)}, not the fp32 master weights "
                "(the engine must keep the module fp32: torch_autocast, not DeepSpeed's bf16/fp16 mode)"
            )
        q_params = [_as_key(q, k) for q, k in zip(q_params, k_params, strict=True)]
        torch._foreach_lerp_(k_params, q_params, 1.0 - momentum)

    def forward(self, images: torch.Tensor):
        return self.encoder(images)


def _as_key(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q in k's dtype (fp32) and strides: a channels-last key encoder beside the engine's contiguous weights
    keeps ``_foreach_lerp_`` on its fused multi-tensor path, which needs matching strides."""
    if q.dtype == k.dtype and q.stride() == k.stride():
        return q
    return torch.empty_like(k).copy_(q)
