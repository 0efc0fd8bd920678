"""Online kNN monitor during pretraining: weighted kNN (Wu et al. 2018) per block on held-out images.

A fixed, seeded draw of at most ``max_bank`` labelled images of ``split_bank`` is the neighbour bank
and at most ``max_val`` images of ``split_val`` are the queries, both through the evaluation
transform. Each call embeds both with the current backbone in eval mode (BatchNorm running statistics
untouched, no gradients), restores its previous mode, and returns ``knn_acc_block<i>`` (single-label
tasks) or ``knn_auc_block<i>`` (macro ROC AUC of the vote scores, multi-label tasks) for blocks 1..4.
The monitor has no collectives: call it on rank 0 only.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ilm_dist.config import AugConfig, MonitorConfig, RunConfig
from ilm_dist.data.manifest import Manifest
from ilm_dist.data.sampling import seeded_draw
from ilm_dist.data.shard_reader import ShardReader
from ilm_dist.eval.features import block_extractor, eval_loader, run_blocks
from ilm_dist.eval.knn import knn_scores
from ilm_dist.eval.metrics import compute_metrics
from ilm_dist.model.encoder import BLOCK_NODES
from ilm_dist.train.validation import Models, ValidatorBuilder

SAMPLE_SEED = 0  # the bank and query draws are the same in every run on a dataset
METRIC_PREFIX = "knn_"  # every record key the monitor logs starts with it


def metric_name(task: str, block: int) -> str:
    """The logged name of block ``block``'s kNN metric: macro ROC AUC for multi-label tasks, else accuracy."""
    return f"{METRIC_PREFIX}{'auc' if task == 'multilabel' else 'acc'}_block{block}"


def metric_names(task: str) -> list[str]:
    return [metric_name(task, block) for block in range(1, len(BLOCK_NODES) + 1)]


def is_monitor_record(record: dict) -> bool:
    """Whether a ``metrics.jsonl`` record was logged by the kNN monitor."""
    return any(key.startswith(METRIC_PREFIX) for key in record)


class KnnMonitor:
    """A pretraining validator (:class:`ilm_dist.train.validation.Validator`) on rank 0, every ``params.every`` steps."""

    main_rank_only = True  # no collectives
    at_end = False  # only every ``every`` steps (a sweep counts its reports)

    def __init__(
        self, params: MonitorConfig, manifest: Manifest, device: torch.device, aug: AugConfig, image_size: int
    ):
        self.params, self.manifest, self.device = params, manifest, device
        self.every = params.every
        self.loaders = {}
        for split, cap in ((params.split_bank, params.max_bank), (params.split_val, params.max_val)):
            reader = ShardReader(manifest, split)
            self.loaders[split] = eval_loader(
                reader,
                aug,
                image_size,
                params.batch_size,
                params.num_workers,
                seeded_draw(len(reader), cap, SAMPLE_SEED),
            )

    @classmethod
    def builder(cls, cfg: RunConfig) -> ValidatorBuilder:
        """What the trainer is handed: builds the monitor on its device, over the manifest it loaded."""
        return lambda where, manifest: cls(cfg.monitor, manifest, where.device, cfg.aug, cfg.data.image_size)

    def __call__(self, models: Models, step: int) -> dict[str, float]:
        """kNN metrics per block of the query encoder's backbone (trainer entry point)."""
        return self.measure(models.query.encoder.backbone)

    def measure(self, backbone: nn.Module) -> dict[str, float]:
        """kNN metrics per block for ``backbone``: a torchvision ResNet, or a module returning
        ``{"layer1": .., "layer4": ..}`` such as ``Encoder.backbone``."""
        extractor = block_extractor(backbone) if hasattr(backbone, "fc") else backbone
        p = self.params
        bank = run_blocks(extractor, self.loaders[p.split_bank], self.device)
        val = run_blocks(extractor, self.loaders[p.split_val], self.device)
        multilabel = self.manifest.task == "multilabel"
        targets = bank.labels if multilabel else np.eye(self.manifest.num_classes)[bank.labels]
        results = {}
        for i, (b, v) in enumerate(zip(bank.blocks, val.blocks, strict=True), start=1):
            scores = knn_scores(b, targets, v, p.k, p.temperature)
            if multilabel:
                value = compute_metrics("multilabel", val.labels, scores, self.manifest.class_names)[
                    "macro_auc"
                ]
            else:
                value = float((scores.argmax(axis=1) == val.labels).mean())
            results[metric_name(self.manifest.task, i)] = value
        return results
