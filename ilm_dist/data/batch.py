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


@dataclass(frozen=True)
class Placement:
    """Where a loader runs, besides its ``data``/``aug`` config sections: this rank of the world, the device
    its batches go to, the run's seed, and whether the model wants channels-last (NHWC) inputs."""

    rank: int
    world_size: int
    device: torch.device
    seed: int
    channels_last: bool = False


class PretrainLoader(Protocol):
    """What a pretraining data backend provides: ``epoch(e, start_step)`` yields this rank's batches of
    epoch ``e`` from step ``start_step`` on.

    The sampling and exact-resume contract (the trainer checkpoints only ``(epoch, step)``):

    1. Equal steps. ``steps_per_epoch`` is the same on every rank, ``num_samples // (B * R)`` for batch
       ``B`` per rank and ``R`` ranks (the remainder of each epoch is left out), so no rank waits in a
       collective for a batch another rank never gets.
    2. Resume is slicing. ``epoch(e, start_step=s)`` yields exactly the batches ``s, s+1, ...`` that
       ``epoch(e)`` yields (same samples, same views), and nothing when ``s >= steps_per_epoch``.
    3. Epochs are independent. An epoch's batches depend on ``(seed, e)`` and the layout, not on the epochs
       before it or on timing.
    4. ``indices`` are the samples' positions in the split, so a batch can be checked against the data.

    The torch backend (`ilm_dist.data.torch_backend`) also keeps the layout out of it: epoch ``e`` is one
    permutation seeded by ``(seed, e)`` cut into global batches of ``R * B`` (`ilm_dist.data.sampling`),
    rank ``r`` takes the ``r``-th block, and each sample's augmentations are seeded by ``(seed, e,
    index)``, so R ranks with ``B`` see the global batches and views of one rank with ``R * B``, whatever
    the worker count, and a run may resume on another ``R``. The DALI backend keeps 1-4 with an order that
    depends on ``R`` and the shuffle buffer, replayed exactly on the CPU (`ilm_dist.data.dali_backend`).
    The synthetic backend yields random tensors and only 1.
    """

    steps_per_epoch: int
    description: str

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[TwoViewBatch]: ...
