"""The training batches of fine-tuning and live probing: labelled training images, sharded over the ranks.

Batches come from :func:`ilm_dist.data.sampling.rank_batches` with augmentations seeded per sample, so
R ranks with ``batch_size / R`` each see the global batches, and the augmentations, of one process with
``batch_size``. Training views (``train_aug``): the run's pretraining augmentations, the evaluation
protocol's for the dataset (:mod:`ilm_dist.eval.protocol`), or none.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from ilm_dist.data.augment import MocoViews, eval_transform
from ilm_dist.data.sampling import steps_per_epoch
from ilm_dist.data.torch_backend import SplitDataset, epoch_loader
from ilm_dist.distributed import rank, world_size
from ilm_dist.eval.context import EvalContext
from ilm_dist.eval.errors import EvalError
from ilm_dist.eval.settings import FitSettings


class TrainBatches:
    """This rank's training batches, epoch after epoch (each ``iter`` is the next epoch).

    Epoch ``e`` is :func:`rank_batches` over the labelled subset: one seeded permutation cut into
    global batches, rank ``r`` taking the ``r``-th block of ``batch_size`` of each (the remainder is
    dropped); augmentations are seeded by (seed, epoch, sample).
    """

    def __init__(self, dataset: SplitDataset, batch_size: int, seed: int, num_workers: int):
        self.dataset, self.batch_size, self.seed, self.num_workers = dataset, batch_size, seed, num_workers
        self.epoch = 0

    def __len__(self) -> int:
        return steps_per_epoch(len(self.dataset), self.batch_size, world_size())

    def __iter__(self):
        _, loader = epoch_loader(
            self.dataset,
            self.batch_size,
            rank(),
            world_size(),
            self.seed,
            self.epoch,
            num_workers=self.num_workers,
        )
        self.epoch += 1
        return iter(loader)


def training_transform(ctx: EvalContext, train_aug: str, aug: dict[str, Any] | None) -> Callable:
    """The training view: the run's MoCo augmentations, the protocol's (``aug``: fields over the run's
    aug section, so the input normalisation stays the context's), or the evaluation view."""
    size, run_aug = ctx.cfg.data.image_size, ctx.cfg.aug
    if train_aug == "none":
        return eval_transform(run_aug, size)
    if train_aug == "moco":
        return MocoViews(run_aug, size, views=1)
    if aug is None:
        raise EvalError(
            f"--train-aug protocol: protocol {ctx.protocol.name!r} sets no training augmentations here "
            "(an 'aug' section); use --train-aug moco or none"
        )
    return MocoViews(dataclasses.replace(run_aug, **aug), size, views=1)


def train_loader(ctx: EvalContext, indices: Sequence[int], settings: FitSettings) -> TrainBatches:
    """Batches of ``min(batch_size, len(indices))`` training views (:func:`training_transform`) over all
    ranks (rounded down to a multiple of the world size when the subset is the smaller)."""
    transform = training_transform(ctx, settings.train_aug, settings.aug)
    dataset = SplitDataset(ctx.reader("train"), transform, indices, seed=settings.seed)
    per_rank = min(settings.batch_size, len(dataset)) // world_size()
    if per_rank == 0:
        raise EvalError(f"{len(dataset)} labelled images cannot fill a batch on each of {world_size()} ranks")
    return TrainBatches(dataset, per_rank, settings.seed, ctx.num_workers)
