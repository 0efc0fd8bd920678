"""What every data backend yields, and the interface it implements."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor


@dataclass
class TwoViewBatch:
    view1: Tensor  # [B, 3, S, S] float, normalised, on the training device
    view2: Tensor
    labels: Tensor  # [B] class index, or [B, C] multi-hot
    indices: Tensor  # [B] sample indices in the split (for checks and resume)

    def to(self, device: torch.device, dtype: torch.dtype, channels_last: bool) -> TwoViewBatch:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        views = [v.to(device, dtype, non_blocking=True, memory_format=fmt) for v in (self.view1, self.view2)]
        return TwoViewBatch(*views, self.labels.to(device), self.indices)


class PretrainLoader(Protocol):
    """One epoch per iteration; ``start_step`` skips the steps a resumed run already did."""

    steps_per_epoch: int
    description: str

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[TwoViewBatch]: ...
