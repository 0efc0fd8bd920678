"""Fine-tuning on a labelled fraction of the train split: the whole network or the linear layer only.

Kaku et al. 2021 (Sec. 4, official ``fine_tune_mocov2.py``): the SSL backbone plus a new linear layer,
trained with Adam (lr 1e-3) on 1%, 6% or 100% of the labels with the pretraining augmentations, the
best-validation model evaluated on the test split. ``linear`` freezes the backbone in eval mode (its
BatchNorm statistics stay fixed; checked after training). Outputs in
``EVAL_DIR/<method>/finetune/<mode>_f<fraction>/``: ``metrics.json``, ``predictions.npz`` (test logits,
probabilities, labels) and ``features_test.npz`` (pooled block features after fine-tuning, for CKA).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from torch.utils.data import DataLoader

from ilm_dist.data.augment import eval_transform, moco_view_transform
from ilm_dist.eval.context import EvalContext
from ilm_dist.eval.features import SplitDataset, eval_loader
from ilm_dist.eval.fit import ADAM_LR, fit, val_score
from ilm_dist.eval.metrics import evaluate_predictions, probabilities
from ilm_dist.eval.store import fraction_tag, read_json, save_npz, write_json
from ilm_dist.eval.subsets import load_or_draw_subset, subset_path
from ilm_dist.eval.weights import assert_unchanged, fingerprint

log = logging.getLogger("ilm_dist")

FRACTIONS = (0.01, 0.06, 1.0)  # Kaku et al. 2021, Sec. 4


@dataclass
class FinetuneSettings:
    mode: Literal["full", "linear"] = "full"
    epochs: int = 10
    min_steps: int = 0  # small fractions still get at least this many optimizer steps
    batch_size: int = 64
    lr: float = ADAM_LR
    evals: int = 10  # validation checks over the run (model selection)
    train_aug: Literal["moco", "none"] = "moco"
    seed: int = 0  # label subset, shuffling, augmentation
    n_boot: int = 1000


def result_dir(ctx: EvalContext, mode: str, fraction: float) -> Path:
    return ctx.method_dir / "finetune" / f"{mode}_{fraction_tag(fraction)}"


def train_loader(ctx: EvalContext, indices: list[int], settings: FinetuneSettings) -> DataLoader:
    size = ctx.cfg.data.image_size
    transform = (
        moco_view_transform(ctx.cfg.aug, size)
        if settings.train_aug == "moco"
        else eval_transform(ctx.cfg.aug, size)
    )
    dataset = SplitDataset(ctx.reader("train"), transform, indices)
    generator = torch.Generator().manual_seed(settings.seed)
    return DataLoader(
        dataset,
        batch_size=min(settings.batch_size, len(dataset)),
        shuffle=True,
        drop_last=True,
        num_workers=ctx.num_workers,
        generator=generator,
    )


def frozen_head(model: nn.Module) -> nn.Module:
    """Freeze everything but ``fc`` and put the backbone in eval mode; returns the trainable head."""
    model.eval()
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith("fc.")
    return model.fc


def finetune(ctx: EvalContext, fraction: float, settings: FinetuneSettings, force: bool = False) -> dict:
    """Fine-tune at one label fraction (or return the saved result)."""
    out = result_dir(ctx, settings.mode, fraction)
    if (out / "metrics.json").is_file() and not force:
        log.info("%s: already done (use --force to recompute)", out)
        return read_json(out / "metrics.json")
    subset = load_or_draw_subset(ctx.eval_dir, ctx.manifest, "train", fraction, settings.seed)
    model = ctx.classifier()
    torch.manual_seed(settings.seed)  # augmentation draws in the main process
    trainable = model if settings.mode == "full" else frozen_head(model)
    before = fingerprint(model) if settings.mode == "linear" else ""
    loader = train_loader(ctx, subset["indices"], settings)
    steps = max(settings.epochs * len(loader), settings.min_steps)
    val = eval_loader(
        ctx.reader("val"), ctx.cfg.aug, ctx.cfg.data.image_size, ctx.batch_size, ctx.num_workers
    )
    log.info(
        "%s: %s fine-tuning on %d labelled images, %d steps",
        ctx.name,
        settings.mode,
        len(loader.dataset),
        steps,
    )
    result = fit(
        model,
        trainable,
        loader,
        ctx.task,
        steps,
        settings.evals,
        lambda: val_score(model, val, ctx.device, ctx.task, ctx.class_names),
        ctx.device,
        settings.lr,
    )
    if settings.mode == "linear":
        assert_unchanged(model, before, f"linear fine-tuning of {ctx.name}")
    test = ctx.features(model, "test", with_logits=True)
    save_npz(out / "features_test.npz", **{f"block{i}": b for i, b in enumerate(test.blocks, start=1)})
    save_npz(
        out / "predictions.npz",
        logits=test.logits,
        probs=probabilities(ctx.task, test.logits),
        labels=test.labels,
    )
    record = {
        "method": ctx.name,
        "kind": "finetune",
        "mode": settings.mode,
        "fraction": fraction,
        "task": ctx.task,
        "class_names": list(ctx.class_names),
        "dataset_id": subset["dataset_id"],
        "subset": {
            "path": str(subset_path(ctx.eval_dir, "train", fraction, settings.seed)),
            "digest": subset["digest"],
            "num_samples": subset["num_samples"],
        },
        "test": {"num_samples": len(test.labels), "digest": ctx.test_digest},
        "settings": asdict(settings),
        "fit": asdict(result),
        **evaluate_predictions(
            ctx.task, test.labels, test.logits, ctx.class_names, settings.n_boot, settings.seed
        ),
    }
    write_json(out / "metrics.json", record)
    return record
