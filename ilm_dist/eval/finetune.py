"""Fine-tuning on a labelled fraction of the train split: the whole network or the linear layer only.

Kaku et al. 2021 (Sec. 4, official ``fine_tune_mocov2.py``): the SSL backbone plus a new linear layer,
trained with Adam (lr 1e-3) on 1%, 6% or 100% of the labels, the best-validation model evaluated on the
test split. Training views (``train_aug``): the run's pretraining augmentations, the evaluation
protocol's for the dataset (:mod:`ilm_dist.eval.protocol`), or none. ``linear`` freezes the backbone's
weights; its BatchNorm stays in eval mode with fixed statistics (``frozen_bn=eval``, checked after
training) or, as the official ``--only-ll``, normalises with batch statistics and updates its running
ones (``frozen_bn=train``; the weights are checked). Outputs in
``EVAL_DIR/<method>/finetune/<mode>_f<fraction>/``: ``metrics.json``, ``predictions.npz`` (test logits,
probabilities, labels) and ``features_test.npz`` (pooled block features after fine-tuning, for CKA).

Batches come from :func:`ilm_dist.data.sampling.rank_batches` with augmentations seeded per sample, so
R ranks with ``batch_size / R`` each see the global batches, and the augmentations, of one process
with ``batch_size``; with gradients averaged over ranks (:func:`fit`) the ``linear`` mode then trains
the same head as one process (up to float rounding). In ``full`` mode BatchNorm normalises with the
statistics of each rank's part of the batch (as in pretraining), so results depend slightly on R;
running statistics are averaged over ranks before each validation. Validation and test run sharded
over the ranks; only rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import nn

from ilm_dist.data.augment import MocoViews, eval_transform
from ilm_dist.data.sampling import steps_per_epoch
from ilm_dist.data.torch_backend import SplitDataset, epoch_loader
from ilm_dist.distributed import on_main, rank, world_size
from ilm_dist.eval.context import EvalContext, result_lock
from ilm_dist.eval.errors import EvalError
from ilm_dist.eval.features import BlockFeatures
from ilm_dist.eval.fit import ADAM_LR, FitResult, fit, fit_option, metric_score, validation_steps
from ilm_dist.eval.metrics import check_metric, evaluate_predictions, probabilities
from ilm_dist.eval.store import finetune_dir, read_json, save_npz, write_json
from ilm_dist.eval.subsets import load_or_draw_subset, subset_path
from ilm_dist.eval.weights import assert_unchanged, fingerprint
from ilm_dist.options import check_bounds, option

log = logging.getLogger("ilm_dist")

FRACTIONS = (0.01, 0.06, 1.0)  # Kaku et al. 2021, Sec. 4


@dataclass
class FinetuneSettings:
    mode: Literal["full", "linear"] = field(
        default="full", metadata=option("train all layers, or the new linear layer only (frozen backbone)")
    )
    epochs: int = fit_option("epochs", 10)
    min_steps: int = fit_option("min_steps", 0)
    batch_size: int = fit_option("batch_size", 64)
    lr: float = fit_option("lr", ADAM_LR)
    evals: int = fit_option("evals", 10)
    eval_each_epoch: bool = fit_option("eval_each_epoch", False)
    train_aug: Literal["moco", "protocol", "none"] = fit_option("train_aug", "moco")
    frozen_bn: Literal["eval", "train"] = fit_option("frozen_bn", "eval")
    select: str | None = fit_option("select", None)
    report: str | None = fit_option("report", None)
    seed: int = fit_option("seed", 0)
    n_boot: int = fit_option("n_boot", 1000)
    ci: Literal["percentile", "official"] = fit_option("ci", "percentile")
    # set by an evaluation protocol, not a flag: AugConfig fields over the run's aug (train_aug=protocol)
    aug: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        check_bounds(self)


def result_dir(ctx: EvalContext, mode: str, fraction: float) -> Path:
    return finetune_dir(ctx.method_dir, mode, fraction)


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


def train_loader(
    ctx: EvalContext, indices: Sequence[int], transform: Callable, batch_size: int, seed: int
) -> TrainBatches:
    """Batches of ``min(batch_size, len(indices))`` images over all ranks (rounded down to a multiple
    of the world size when the subset is the smaller)."""
    dataset = SplitDataset(ctx.reader("train"), transform, indices, seed=seed)
    per_rank = min(batch_size, len(dataset)) // world_size()
    if per_rank == 0:
        raise EvalError(f"{len(dataset)} labelled images cannot fill a batch on each of {world_size()} ranks")
    return TrainBatches(dataset, per_rank, seed, ctx.num_workers)


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
    model = ctx.classifier()
    linear, bn_frozen = settings.mode == "linear", settings.frozen_bn == "eval"
    trainable = frozen_head(model, settings.frozen_bn) if linear else model
    before = fingerprint(model, buffers=bn_frozen) if linear else ""
    transform = training_transform(ctx, settings.train_aug, settings.aug)
    loader = train_loader(ctx, subset["indices"], transform, settings.batch_size, settings.seed)
    steps = max(settings.epochs * len(loader), settings.min_steps)
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
        steps,
        validation_steps(steps, len(loader), settings.evals, settings.eval_each_epoch),
        lambda: metric_score(select, ctx.task, *ctx.predictions(model, "val"), ctx.class_names),
        ctx.device,
        settings.lr,
        data_parallel=True,
    )
    if linear:
        assert_unchanged(model, before, f"linear fine-tuning of {ctx.name}", buffers=bn_frozen)
    test = ctx.features(model, "test", with_logits=True)
    return on_main(lambda: _save(ctx, out, fraction, settings, subset, test, result, select, report))


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
