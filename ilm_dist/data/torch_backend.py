"""The CPU data path: shards read by index in DataLoader workers, augmented with torchvision."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from ilm_dist.config import AugConfig
from ilm_dist.data.augment import moco_view_transform
from ilm_dist.data.batch import TwoViewBatch
from ilm_dist.data.manifest import load_manifest
from ilm_dist.data.sampling import rank_batches, sample_seed, steps_per_epoch
from ilm_dist.data.shard_format import squeeze_labels
from ilm_dist.data.shards import ShardReader


class TwoViewDataset(Dataset):
    """Sample ``i`` -> two independently augmented views, seeded by (seed, epoch, i)."""

    def __init__(self, reader: ShardReader, aug: AugConfig, image_size: int, seed: int):
        self.reader = reader
        self.transform = moco_view_transform(aug, image_size)
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        image = self.reader.image(index)
        # torchvision's random transforms draw from torch's global RNG: seeding it per sample
        # makes the views independent of worker count, rank count and resume point.
        torch.manual_seed(sample_seed(self.seed, self.epoch, index))
        return self.transform(image), self.transform(image), torch.from_numpy(self.reader.label(index)), index


def collate(items: list) -> TwoViewBatch:
    view1, view2, labels, indices = zip(*items, strict=True)
    return TwoViewBatch(
        torch.stack(view1), torch.stack(view2), squeeze_labels(torch.stack(labels)), torch.tensor(indices)
    )


class TorchLoader:
    def __init__(self, cfg, rank: int, world_size: int, device: torch.device):
        manifest = load_manifest(cfg.data.shards)
        self.dataset = TwoViewDataset(
            ShardReader(manifest, cfg.data.split), cfg.aug, cfg.data.image_size, cfg.seed
        )
        self.cfg, self.rank, self.world_size, self.device = cfg, rank, world_size, device
        self.steps_per_epoch = steps_per_epoch(len(self.dataset), cfg.data.batch_size, world_size)
        self.description = (
            f"torch: {len(self.dataset)} samples of {cfg.data.shards} [{cfg.data.split}], "
            f"{cfg.data.num_workers} workers, {self.steps_per_epoch} steps/epoch"
        )

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[TwoViewBatch]:
        self.dataset.epoch = epoch
        batches = rank_batches(
            len(self.dataset),
            self.cfg.data.batch_size,
            self.rank,
            self.world_size,
            self.cfg.seed,
            epoch,
            start_step,
        )
        workers = self.cfg.data.num_workers
        loader = DataLoader(
            self.dataset,
            batch_sampler=batches,
            num_workers=workers,
            collate_fn=collate,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
            prefetch_factor=4 if workers else None,
        )
        yield from loader
