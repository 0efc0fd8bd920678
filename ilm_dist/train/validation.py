"""Components the trainer runs every few steps on the models it trains, without knowing what they measure.

The trainer is handed *builders* (``(Placement, Manifest) -> Validator``), builds them once it knows its
rank and device and has loaded the data's manifest, and
every ``validator.every`` optimizer steps (and at the last step when ``at_end``) logs what
``validator(models, step)`` returns. A validator with ``main_rank_only`` runs on rank 0 alone and must
not use collectives (the other ranks wait at the next one). The online kNN monitor
(:class:`ilm_dist.eval.monitor.KnnMonitor`) is one; :class:`ValidationLoss` is another. The trainer
imports neither.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader

from ilm_dist import distributed as D
from ilm_dist.config import AugConfig, DataConfig, RunConfig, ValConfig
from ilm_dist.data.augment import MocoViews, eval_transform
from ilm_dist.data.batch import Placement
from ilm_dist.data.manifest import Manifest
from ilm_dist.data.sampling import rank_shard, seeded_draw
from ilm_dist.data.shard_reader import ShardReader
from ilm_dist.data.torch_backend import SplitDataset, TwoViews
from ilm_dist.errors import InputError

log = logging.getLogger("ilm_dist")

VAL_PREFIX = "val_"  # every record key the validation loss logs starts with it


@dataclass(frozen=True)
class Models:
    """What a validator may look at (read-only): the trainable MoCo module, the key encoder, the queue."""

    query: nn.Module  # ilm_dist.model.moco.MoCoILM: .encoder.backbone is the torchvision ResNet's body
    key_encoder: nn.Module
    queue: torch.Tensor


class Validator(Protocol):
    every: int  # optimizer steps between calls
    at_end: bool  # also called at the last step
    main_rank_only: bool

    def __call__(self, models: Models, step: int) -> dict[str, float]: ...


# what the trainer calls with this rank's Placement and the manifest of the data it trains on
ValidatorBuilder = Callable[[Placement, Manifest | None], Validator]


def selection_criterion(val: ValConfig) -> dict[str, object]:
    """What selects the best backbone: the logged metric (``val_loss`` or ``val_moco``) and what it is
    measured on (:class:`ilm_dist.train.selection.BestBackbone`)."""
    return {
        "metric": VAL_PREFIX + val.select,
        "split": val.split,
        "views": val.views,
        "max_samples": val.max_samples,
    }


class ValidationLoss:
    """The pretraining loss on a held-out split: ``val_loss``, ``val_moco``, ``val_<term>`` (and
    ``val_moco_acc``), the means over its samples.

    Both encoders run in eval mode (BatchNorm on running statistics) without gradients, against the queue
    as it is; none of them changes (the official validation step momentum-updates the key encoder and
    enqueues the validation keys; ilm_dist does neither, see docs/PROTOCOL.md). The split (or a seeded
    draw of ``val.max_samples``) is cut into whole batches of ``data.batch_size``, the last partial batch
    dropped as in the official val loader, and the batches are split over the ranks: each batch runs on one
    rank exactly as in one process (the Barlow Twins term depends on the batch), and the per-batch sums are
    all-reduced, so the means do not depend on the number of ranks. Every rank returns the same values.
    """

    main_rank_only = False  # an all-reduce of the sums
    at_end = True  # the last step's weights are a candidate too

    def __init__(
        self, val: ValConfig, data: DataConfig, aug: AugConfig, where: Placement, manifest: Manifest
    ):
        batch = data.batch_size
        self.every, self.device = val.every, where.device
        self.memory_format = torch.channels_last if where.channels_last else torch.contiguous_format
        reader = ShardReader(manifest, val.split)
        drawn = seeded_draw(len(reader), val.max_samples)
        self.num_samples = len(drawn) // batch * batch
        if self.num_samples == 0:
            raise InputError(
                f"val.split: split {val.split!r} of {data.shards} has {len(drawn)} samples to validate on, "
                f"fewer than one batch of data.batch_size={batch}"
            )
        mine = drawn[: self.num_samples][rank_shard(self.num_samples, batch, where.rank, where.world_size)]
        views = (
            MocoViews(aug, data.image_size, views=2)
            if val.views == "augmented"
            else TwoViews(eval_transform(aug, data.image_size))
        )
        dataset = SplitDataset(reader, views, mine, seed=where.seed)
        self.loader = DataLoader(
            dataset, batch_size=batch, num_workers=val.num_workers, collate_fn=dataset.collate
        )
        self.description = (
            f"validation loss every {val.every} steps and at the last: {self.num_samples} samples of "
            f"{data.shards} [{val.split}] ({len(drawn) - self.num_samples} of the draw dropped), "
            f"{self.num_samples // batch} batches of {batch}, {val.views} views"
        )
        if where.rank == 0:
            log.info("%s", self.description)

    @classmethod
    def builder(cls, cfg: RunConfig) -> ValidatorBuilder:
        """What the trainer is handed: builds the validator for its rank, device and manifest."""
        return lambda where, manifest: cls(cfg.val, cfg.data, cfg.aug, where, manifest)

    @torch.no_grad()
    def __call__(self, models: Models, step: int) -> dict[str, float]:
        query, key = models.query, models.key_encoder
        names = query.term_names()
        sums = torch.zeros(len(names) + 1, dtype=torch.float64, device=self.device)
        modes = query.training, key.training
        query.eval()
        key.eval()
        try:
            for (view1, view2), _ in self.loader:
                view1, view2 = (
                    v.to(self.device, non_blocking=True, memory_format=self.memory_format)
                    for v in (view1, view2)
                )
                terms = query(view1, query.key_features(key, view2), models.queue)
                values = torch.stack([terms[name].detach().double() for name in names])
                sums += torch.cat([values * len(view1), values.new_tensor([len(view1)])])
        finally:
            query.train(modes[0])
            key.train(modes[1])
        *totals, count = D.all_reduce_sum_(sums).tolist()
        return {VAL_PREFIX + name: total / count for name, total in zip(names, totals, strict=True)}
