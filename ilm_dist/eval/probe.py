"""Layer-wise probing: a linear classifier on the pooled output of each frozen block (Kaku et al. 2021, Sec. 5).

Two paths, by what the frozen backbone sees:

- cached (``frozen_bn=eval``, ``train_aug=none``; ilm_dist's default): the backbone runs once per split in
  eval mode without augmentation and its pooled block features are cached (``features_<split>.npz``);
  each block's linear layer is trained on them, standardised with the train mean/std unless
  ``standardise`` is off, and the backbone's full ``state_dict`` (weights and BatchNorm statistics) is
  hashed before and after: any change fails.
- live (``frozen_bn=train`` or training augmentations; the official probing code): each block gets its
  own copy of the network up to that block, run on augmented training images with no gradient and, with
  ``frozen_bn=train``, BatchNorm in train mode (batch statistics, running statistics updated, as a
  PyTorch Lightning module in train mode does), then globally pooled (raw features) into the linear
  layer; validation and test run in eval mode on the statistics training left. Its weights are checked.

Every head is trained with Adam (lr 1e-3, official probing code), selected on validation by ``select``
and scored on test; the test probabilities of every block are saved in ``predictions.npz``. Outputs in
``EVAL_DIR/<method>/probe/f<fraction>/``.

Under the ``deepspeed`` launcher the cached features are extracted sharded over the ranks and gathered,
so every rank holds all of them; every rank then fits the same linear heads (rather than waiting in a
collective while rank 0 alone fits, which on a large set could outlast ``engine.collective_timeout_s``).
The live path trains data-parallel as fine-tuning does. Rank 0 alone writes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.models.feature_extraction import create_feature_extractor

from ilm_dist.distributed import on_main
from ilm_dist.eval.context import SPLITS, EvalContext, result_lock, saved_or_computed
from ilm_dist.eval.errors import EvalError
from ilm_dist.eval.fit import FitResult, fit, predict, torch_threads, val_score
from ilm_dist.eval.metrics import check_metric, evaluate_predictions, probabilities
from ilm_dist.eval.settings import ProbeSettings
from ilm_dist.eval.store import probe_result_dir, read_json, save_npz, write_json
from ilm_dist.eval.subsets import load_or_draw_subset
from ilm_dist.eval.training_data import train_loader
from ilm_dist.eval.weights import assert_unchanged, fingerprint
from ilm_dist.model.encoder import BLOCK_NODES, block_channels

log = logging.getLogger("ilm_dist")

PREDICTIONS = "predictions.npz"  # test labels and each block's test probabilities (block<i>_probs)


class Scored(NamedTuple):
    """One block's test metrics record, its test probabilities and the test labels."""

    record: dict
    probs: np.ndarray
    labels: np.ndarray


def probe_dir(ctx: EvalContext, fraction: float) -> Path:
    return probe_result_dir(ctx.method_dir, fraction)


def cached_features(
    ctx: EvalContext, backbone: nn.Module, out: Path, indices: list[int], force: bool
) -> dict:
    """``{split: {"block1".."block4", "labels"}}``, extracted once per split (on every rank)."""
    return {
        split: saved_or_computed(
            out / f"features_{split}.npz",
            force,
            lambda split=split: ctx.features(backbone, split, indices if split == "train" else None).arrays(),
        )
        for split in SPLITS
    }


def _tensors(x: np.ndarray, labels: np.ndarray, mean: np.ndarray, std: np.ndarray) -> TensorDataset:
    return TensorDataset(torch.from_numpy((x - mean) / std).float(), torch.from_numpy(labels))


def fit_head(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    settings: ProbeSettings,
    task: str,
    class_names: tuple[str, ...],
    device: torch.device,
) -> tuple[nn.Linear, FitResult, Callable[[np.ndarray, np.ndarray], TensorDataset]]:
    """A linear head fitted on cached ``(features, labels)`` of train, selected on val; also the feature
    transform it was fitted with (standardised with the train mean/std unless ``standardise`` is off)."""
    features = train[0]
    mean, std = np.zeros(features.shape[1]), np.ones(features.shape[1])
    if settings.standardise:
        mean, std = features.mean(axis=0), features.std(axis=0)
        std[std < 1e-6] = 1.0  # dead (constant) features stay zero after centring
    dataset = partial(_tensors, mean=mean, std=std)
    torch.manual_seed(settings.seed)
    head = nn.Linear(features.shape[1], len(class_names)).to(device)
    generator = torch.Generator().manual_seed(settings.seed)
    loader = DataLoader(
        dataset(*train),
        batch_size=min(settings.batch_size, len(features)),
        shuffle=True,
        drop_last=True,
        generator=generator,
    )
    val_loader = DataLoader(dataset(*val), batch_size=4096)

    def score(metric: str) -> float:
        return val_score(head, val_loader, device, metric, task, class_names)

    return head, fit(head, head, loader, task, settings, score, device), dataset


def probe_block(ctx: EvalContext, feats: dict, block: str, settings: ProbeSettings) -> Scored:
    """One block's head on cached features."""
    train, val, test = ((feats[s][block], feats[s]["labels"]) for s in SPLITS)
    head, result, dataset = fit_head(train, val, settings, ctx.task, ctx.class_names, ctx.device)
    test_loader = DataLoader(dataset(*test), batch_size=4096)
    return _scored(ctx, settings, result, *predict(head, test_loader, ctx.device))


class BlockProbe(nn.Module):
    """The network up to block ``block`` (frozen, no gradient), globally pooled, and a linear head."""

    def __init__(self, resnet: nn.Module, block: int, num_classes: int, frozen_bn: str):
        super().__init__()
        self.body = create_feature_extractor(resnet, return_nodes={BLOCK_NODES[block - 1]: "features"})
        self.body.requires_grad_(False)
        self.head = nn.Linear(block_channels(resnet)[block - 1], num_classes)
        self.frozen_bn = frozen_bn

    def train(self, mode: bool = True) -> BlockProbe:
        """In training only the head, or with ``frozen_bn="train"`` also the body's BatchNorm, is in train mode."""
        super().train(mode)
        if self.frozen_bn == "eval":
            self.body.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = self.body(images)["features"].float().mean(dim=(2, 3))
        return self.head(features)


def probe_block_live(ctx: EvalContext, indices: list[int], block: int, settings: ProbeSettings) -> Scored:
    """One block's head on the frozen network run at every step (data-parallel under the launcher)."""
    net = BlockProbe(ctx.classifier(), block, ctx.manifest.num_classes, settings.frozen_bn).to(ctx.device)
    before = fingerprint(net.body, buffers=False)
    loader = train_loader(ctx, indices, settings)
    result = fit(
        net, net, loader, ctx.task, settings, partial(ctx.val_score, net), ctx.device, data_parallel=True
    )
    assert_unchanged(net.body, before, f"probing block {block} of {ctx.name}", buffers=False)
    return _scored(ctx, settings, result, *ctx.predictions(net, "test"))


def _scored(
    ctx: EvalContext, settings: ProbeSettings, result, logits: np.ndarray, labels: np.ndarray
) -> Scored:
    report = check_metric(settings.report, ctx.task, "--report")
    record = {
        "fit": asdict(result),
        "selected_by": check_metric(settings.select, ctx.task, "--select"),
        **evaluate_predictions(
            ctx.task, labels, logits, ctx.class_names, settings.n_boot, settings.seed, settings.ci, report
        ),
    }
    return Scored(record, probabilities(ctx.task, logits), labels)
    return record, logits


def probe(ctx: EvalContext, settings: ProbeSettings, force: bool = False) -> dict:
    """Probe every block of the initial weights (or return the saved result), holding its result folder's lock."""
    out = probe_dir(ctx, settings.fraction)
    with result_lock(out, f"probe of {ctx.name}"):
        return _probe(ctx, out, settings, force)


def _probe(ctx: EvalContext, out: Path, settings: ProbeSettings, force: bool) -> dict:
    path = out / "metrics.json"
    saved = on_main(lambda: read_json(path) if path.is_file() and not force else None)
    if saved is not None:  # rank 0 decides, so every rank takes the same branch
        log.info("%s: already done (use --force to recompute)", out)
        return saved
    for name, flag in ((settings.select, "--select"), (settings.report, "--report")):
        check_metric(name, ctx.task, flag)
    if settings.live and settings.standardise:
        raise EvalError(
            "--standardise needs cached features, but this probe runs the backbone at every step "
            f"(--frozen-bn {settings.frozen_bn}, --train-aug {settings.train_aug}); pass --no-standardise"
        )
    subset = on_main(
        lambda: load_or_draw_subset(ctx.eval_dir, ctx.manifest, "train", settings.fraction, settings.seed)
    )
    backbone = ctx.classifier()
    before = fingerprint(backbone)
    scored = {}
    if settings.live:
        for i in range(1, len(BLOCK_NODES) + 1):
            log.info("%s: probing block %d on live %s features", ctx.name, i, settings.frozen_bn)
            scored[f"block{i}"] = probe_block_live(ctx, subset["indices"], i, settings)
    else:
        feats = cached_features(ctx, backbone, out, subset["indices"], force)
        with torch_threads(1):
            for i in range(1, len(BLOCK_NODES) + 1):
                log.info("%s: probing block %d", ctx.name, i)
                scored[f"block{i}"] = probe_block(ctx, feats, f"block{i}", settings)
        assert_unchanged(backbone, before, f"probing {ctx.name}")
    labels = scored["block1"].labels
    blocks = {block: s.record for block, s in scored.items()}
    record = {
        "method": ctx.name,
        "kind": "probe",
        "fraction": settings.fraction,
        "task": ctx.task,
        "class_names": list(ctx.class_names),
        "dataset_id": subset["dataset_id"],
        "subset": {"digest": subset["digest"], "num_samples": subset["num_samples"]},
        "test": {"num_samples": len(labels), "digest": ctx.test_digest},
        "classes_without_samples": ctx.classes_without_samples(),
        "backbone_sha256": before,
        "settings": asdict(settings),
        "protocol": ctx.protocol.summary(),
        "blocks": blocks,
    }
    probs = {f"{block}_probs": s.probs for block, s in scored.items()}
    on_main(lambda: save_npz(out / PREDICTIONS, labels=labels, **probs))
    on_main(lambda: write_json(path, record))
    return record
