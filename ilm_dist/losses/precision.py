"""Losses in fp32 inside the engine's ``torch.autocast`` forward.

Autocast runs every matmul in bf16/fp16, the InfoNCE logits ``q . queue / T`` and the Barlow Twins
cross-correlation included: with T = 0.07 a logit near 10 would carry bf16's spacing of 0.06. The
losses therefore run with autocast off, on inputs they cast to fp32 themselves.
"""

from __future__ import annotations

import torch
from torch import Tensor


def autocast_off(like: Tensor) -> torch.autocast:
    """A context that disables autocast on ``like``'s device type."""
    return torch.autocast(like.device.type, enabled=False)
