"""Fine-tuning on a labelled fraction of the train split: the whole network or the linear layer only.

Kaku et al. 2021 (Sec. 4, official ``fine_tune_mocov2.py``): the SSL backbone plus a new linear layer,
trained with Adam (lr 1e-3) on 1%, 6% or 100% of the labels, the best-validation model evaluated on the
test split. Training views and batches: :mod:`ilm_dist.eval.training_data`. ``linear`` freezes the
backbone's weights; its BatchNorm stays in eval mode with fixed statistics (``frozen_bn=eval``, checked
after training) or, as the official ``--only-ll``, normalises with batch statistics and updates its
running ones (``frozen_bn=train``; the weights are checked). Outputs in
``EVAL_DIR/<method>/finetune/<mode>_f<fraction>/``: ``metrics.json``, ``predictions.npz`` (test logits,
probabilities, labels) and ``features_test.npz`` (pooled block features after fine-tuning, for CKA).

R ranks with ``batch_size / R`` each see the global batches of one process with ``batch_size``; with
gradients averaged over ranks (:func:`fit`) the ``linear`` mode then trains the same head as one process
(up to float rounding). In ``full`` mode BatchNorm normalises with the statistics of each rank's part of
the batch (as in pretraining), so results depend slightly on R; running statistics are averaged over
ranks before each validation. Validation and test run sharded over the ranks; only rank 0 writes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict
from functools import partial
from pathlib import Path

from torch import nn

from ilm_dist.distributed import on_main, world_size
from ilm_dist.eval.context import EvalContext, result_lock
from ilm_dist.eval.errors import EvalError
from ilm_dist.eval.features import BlockFeatures
from ilm_dist.eval.fit import FitResult, fit, schedule
from ilm_dist.eval.metrics import check_metric, evaluate_predictions, probabilities
from ilm_dist.eval.settings import FinetuneSettings
from ilm_dist.eval.store import finetune_dir, read_json, save_npz, write_json
from ilm_dist.eval.subsets import load_or_draw_subset, subset_path
from ilm_dist.eval.training_data import train_loader
from ilm_dist.eval.weights import assert_unchanged, fingerprint

log = logging.getLogger("ilm_dist")

FRACTIONS = (0.01, 0.06, 1.0)  # Kaku et al. 2021, Sec. 4


def result_dir(ctx: EvalContext, mode: str, fraction: float) -> Path:
    return finetune_dir(ctx.method_dir, mode, fraction)


def frozen_head(model: nn.Module, frozen_bn: str = "eval") -> nn.Module:
    """Freeze every weight but ``fc``'s; returns what :func:`fit` trains: ``fc``, the backbone staying in
    eval mode, or with ``frozen_bn="train"`` the whole model, whose BatchNorm then runs in train mode."""
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith("fc.")
    if frozen_bn == "train":
        return model
    model.eval()
    return model.fc


def check_batch_size(batch_size: int) -> None:
    """The global batch must split evenly over the ranks."""
    if batch_size < 1 or batch_size % world_size():
        raise EvalError(
            f"--batch-size {batch_size} (global) does not split over {world_size()} ranks; "
            f"use a positive multiple of {world_size()}"
        )


def finetune(ctx: EvalContext, fraction: float, settings: FinetuneSettings, force: bool = False) -> dict:
    """Fine-tune at one label fraction (or return the saved result), holding its result folder's lock."""
    out = result_dir(ctx, settings.mode, fraction)
    with result_lock(out, f"{settings.mode} fine-tuning of {ctx.name}"):
        return _finetune(ctx, out, fraction, settings, force)


def _finetune(ctx: EvalContext, out: Path, fraction: float, settings: FinetuneSettings, force: bool) -> dict:
    path = out / "metrics.json"
    saved = on_main(lambda: read_json(path) if path.is_file() and not force else None)
    if saved is not None:  # rank 0 decides, so every rank takes the same branch
        log.info("%s: already done (use --force to recompute)", out)
        return saved
    check_batch_size(settings.batch_size)
    select = check_metric(settings.select, ctx.task, "--select")
    report = check_metric(settings.report, ctx.task, "--report")
    subset = on_main(
        lambda: load_or_draw_subset(ctx.eval_dir, ctx.manifest, "train", fraction, settings.seed)
    )
    model, result = train_on_subset(ctx, subset["indices"], settings)
    test = ctx.features(model, "test", with_logits=True)
    return on_main(lambda: _save(ctx, out, fraction, settings, subset, test, result, select, report))


def train_on_subset(
    ctx: EvalContext, indices: Sequence[int], settings: FinetuneSettings
) -> tuple[nn.Module, FitResult]:
    """The classifier fine-tuned on the training images ``indices`` (``settings.mode``), selected on val;
    in linear mode, checked to have left the backbone (and with eval-mode BatchNorm, its statistics) as it was."""
    model = ctx.classifier()
    linear, bn_frozen = settings.mode == "linear", settings.frozen_bn == "eval"
    trainable = frozen_head(model, settings.frozen_bn) if linear else model
    before = fingerprint(model, buffers=bn_frozen) if linear else ""
    loader = train_loader(ctx, indices, settings)
    steps, _ = schedule(settings, len(loader))
    log.info(
        "%s: %s fine-tuning on %d labelled images, %d steps of %d ranks x %d",
        ctx.name,
        settings.mode,
        len(loader.dataset),
        steps,
        world_size(),
        loader.batch_size,
    )
    result = fit(
        model,
        trainable,
        loader,
        ctx.task,
        settings,
        partial(ctx.val_score, model),
        ctx.device,
        data_parallel=True,
    )
    if linear:
        assert_unchanged(model, before, f"linear fine-tuning of {ctx.name}", buffers=bn_frozen)
    return model, result


def _save(
    ctx: EvalContext,
    out: Path,
    fraction: float,
    settings: FinetuneSettings,
    subset: dict,
    test: BlockFeatures,
    result: FitResult,
    select: str,
    report: str,
) -> dict:
    """Rank 0: test predictions, features and ``metrics.json`` (with bootstrap CIs); returns the record."""
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
        "classes_without_samples": ctx.classes_without_samples(),
        "settings": asdict(settings),
        "protocol": ctx.protocol.summary(),
        "selected_by": select,
        "fit": asdict(result),
        **evaluate_predictions(
            ctx.task,
            test.labels,
            test.logits,
            ctx.class_names,
            settings.n_boot,
            settings.seed,
            settings.ci,
            report,
        ),
    }
    write_json(out / "metrics.json", record)
    return record
