"""The CPU data path: shards read by index in DataLoader workers, augmented with torchvision.

`SplitDataset` and `epoch_loader` are also what evaluation uses (features, fine-tuning), so pretraining
and fine-tuning share one per-sample seeding and one batching rule.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ilm_dist.config import AugConfig, DataConfig
from ilm_dist.data.augment import moco_view_transform
from ilm_dist.data.batch import Placement, TwoViewBatch
from ilm_dist.data.manifest import load_manifest
from ilm_dist.data.sampling import rank_batches, sample_seed, steps_per_epoch
from ilm_dist.data.shard_format import squeeze_labels
from ilm_dist.data.shard_reader import ShardReader


class SplitDataset(Dataset):
    """``(transform(image), label)`` of one split, in split order or at ``indices``.

    With a ``seed``, the random transforms of sample ``index`` draw from torch's CPU generator seeded by
    ``(seed, epoch, index)``: augmentations depend on the sample, not on the number of ranks or workers, the
    batch a sample lands in or the step a run resumed from. torchvision's random transforms draw from that
    global generator, so seeding it per sample in the worker that loads it is what makes them exact.
    """

    def __init__(
        self,
        reader: ShardReader,
        transform: Callable,
        indices: Sequence[int] | None = None,
        seed: int | None = None,
    ):
        self.reader, self.transform, self.seed, self.epoch = reader, transform, seed, 0
        self.indices = list(range(len(reader))) if indices is None else [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, Tensor]:
        index = self.indices[i]
        if self.seed is not None:
            torch.default_generator.manual_seed(sample_seed(self.seed, self.epoch, index))
        return self.transform(self.reader.image(index)), torch.from_numpy(self.reader.label(index))


class TwoViews:
    """A transform that draws two independent views of one image (MoCo's query and key)."""

    def __init__(self, transform: Callable):
        self.transform = transform

    def __call__(self, image: Image.Image) -> tuple[Tensor, Tensor]:
        return self.transform(image), self.transform(image)


def epoch_loader(
    dataset: SplitDataset,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    epoch: int,
    start_step: int = 0,
    num_workers: int = 0,
    **loader_options: Any,
) -> tuple[list[list[int]], DataLoader]:
    """This rank's batches of ``epoch`` (`rank_batches` over the dataset's positions, from ``start_step``)
    and the DataLoader that yields them in that order; augmentations seeded by ``(seed, epoch, sample)``."""
    dataset.epoch = epoch
    batches = rank_batches(len(dataset), batch_size, rank, world_size, seed, epoch, start_step)
    return batches, DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, **loader_options)


class TorchLoader:
    """`PretrainLoader` over a split's shards: two MoCo views per sample, the batches of `rank_batches`."""

    def __init__(self, data: DataConfig, aug: AugConfig, where: Placement):
        manifest = load_manifest(data.shards)
        views = TwoViews(moco_view_transform(aug, data.image_size))
        self.dataset = SplitDataset(ShardReader(manifest, data.split), views, seed=where.seed)
        self.data, self.where = data, where
        self.steps_per_epoch = steps_per_epoch(len(self.dataset), data.batch_size, where.world_size)
        self.description = (
            f"torch: {len(self.dataset)} samples of {data.shards} [{data.split}], "
            f"{data.num_workers} workers, {self.steps_per_epoch} steps/epoch"
        )

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[TwoViewBatch]:
        workers, where = self.data.num_workers, self.where
        batches, loader = epoch_loader(
            self.dataset,
            self.data.batch_size,
            where.rank,
            where.world_size,
            where.seed,
            epoch,
            start_step,
            workers,
            pin_memory=where.device.type == "cuda",
            persistent_workers=False,
            prefetch_factor=4 if workers else None,
        )
        for indices, ((view1, view2), labels) in zip(batches, loader, strict=True):
            yield TwoViewBatch(view1, view2, squeeze_labels(labels), torch.tensor(indices))
