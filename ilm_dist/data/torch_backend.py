"""The CPU data path: shards read by index in DataLoader workers, augmented with torchvision.

`SplitDataset` and `epoch_loader` are also what evaluation uses (features, fine-tuning), so pretraining
and fine-tuning share one per-sample seeding and one batching rule.
"""

from __future__ import annotations

import signal
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate

from ilm_dist.config import AugConfig, DataConfig
from ilm_dist.data.augment import MocoViews
from ilm_dist.data.batch import Placement, TwoViewBatch
from ilm_dist.data.manifest import Manifest
from ilm_dist.data.sampling import rank_batches, sample_seed, steps_per_epoch
from ilm_dist.data.shard_format import squeeze_labels
from ilm_dist.data.shard_reader import ShardReader


class SplitDataset(Dataset):
    """``(transform(image), label)`` of one split, in split order or at ``indices``; batches made by
    :meth:`collate` (the DataLoader's ``collate_fn``).

    ``transform`` is a per-image transform (e.g. ``eval_transform``) or :class:`MocoViews`, whose random
    views are drawn per sample here and computed per batch in :meth:`collate`. With a ``seed``, sample
    ``index`` draws from a generator seeded by ``(seed, epoch, index)``: augmentations depend on the sample,
    not on the number of ranks or workers, the batch a sample lands in or the step a run resumed from.
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
        label = torch.from_numpy(self.reader.label(index))
        if not isinstance(self.transform, MocoViews):
            return self.transform(self.reader.image(index)), label
        seed = None if self.seed is None else sample_seed(self.seed, self.epoch, index)
        return self.transform.sample(self.reader.pixels(index), np.random.default_rng(seed)), label

    def collate(self, items: list[tuple[Any, Tensor]]) -> tuple[Any, Tensor]:
        """A batch: ``(views, labels)``, the views a list of ``[B, 3, S, S]`` tensors for 2+ views."""
        if not isinstance(self.transform, MocoViews):
            return default_collate(items)
        samples, labels = zip(*items, strict=True)
        views = self.transform.collate(list(samples))
        return views[0] if len(views) == 1 else views, torch.stack(labels)


class TwoViews:
    """A per-image transform applied twice: a query and a key view (the validation loss's ``eval`` views)."""

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
    loader = DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=dataset.collate,
        worker_init_fn=leave_sigterm_to_the_parent,
        **loader_options,
    )
    return batches, loader


def leave_sigterm_to_the_parent(worker_id: int) -> None:
    """A SIGTERM to the whole process group (``timeout``, a scheduler) stops the training process, which ends its
    workers; a worker killed by it first made the DataLoader raise a second error beside the trainer's. And a
    worker handing a batch's shared memory to a parent that is going away (multiprocessing's resource_sharer
    thread) loses the connection: that is the parent's exit, not an error to print."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.excepthook = _quiet_when_the_parent_left


def _quiet_when_the_parent_left(args: threading.ExceptHookArgs) -> None:
    frames = traceback.extract_tb(args.exc_traceback)
    if issubclass(args.exc_type, ConnectionError) and any("resource_sharer" in f.filename for f in frames):
        return
    threading.__excepthook__(args)


class TorchLoader:
    """`PretrainLoader` over a split's shards: two MoCo views per sample, the batches of `rank_batches`."""

    def __init__(self, data: DataConfig, aug: AugConfig, where: Placement, manifest: Manifest):
        views = MocoViews(aug, data.image_size, views=2)
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
