"""Synthetic backend: random tensors created on the training device (no decode, no copy).

It measures the training step's own speed (the benchmarks' upper bound); its images carry no
structure. For a dataset with real class structure use ``python -m data_tools.synthetic_dataset``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ilm_dist.config import AugConfig, DataConfig
from ilm_dist.data.batch import Placement, TwoViewBatch
from ilm_dist.data.sampling import steps_per_epoch

POOL = 4  # distinct batches kept on the device and cycled


class RandomTensorLoader:
    def __init__(self, data: DataConfig, aug: AugConfig, where: Placement, manifest: None):
        syn, size, batch, device = data.synthetic, data.image_size, data.batch_size, where.device
        gen = torch.Generator(device="cpu").manual_seed(where.seed * 1000 + where.rank)
        shape = (POOL, 2, batch, 3, size, size)
        self.pool = torch.randn(shape, generator=gen).to(device)
        self.labels = torch.randint(0, syn.num_classes, (POOL, batch), generator=gen).to(device)
        self.batch = batch
        self.steps_per_epoch = steps_per_epoch(syn.num_samples, batch, where.world_size)
        self.description = (
            f"synthetic: {syn.num_samples} random samples on {device}, {self.steps_per_epoch} steps/epoch"
        )

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[TwoViewBatch]:
        for step in range(start_step, self.steps_per_epoch):
            i = step % POOL
            yield TwoViewBatch(self.pool[i, 0], self.pool[i, 1], self.labels[i], torch.arange(self.batch))
