"""The one-line plan every pretraining run logs at its start (and the dry run prints)."""

from __future__ import annotations

from ilm_dist.config import OptimConfig, TrainConfig, ValConfig
from ilm_dist.data.sampling import GlobalBatch
from ilm_dist.train.optim import scaled_lr
from ilm_dist.train.run_dir import RunDir


def training_plan(
    train: TrainConfig,
    optim: OptimConfig,
    val: ValConfig,
    run: RunDir,
    batch: GlobalBatch,
    steps_per_epoch: int,
) -> str:
    """One line: length, global batch, LR after scaling and what the run saves (logged at every start).

    ``steps_per_epoch`` counts optimizer steps (loader batches per rank // ``batch.accumulation``).
    """
    if train.max_steps is not None:
        steps = train.max_steps
        epochs = steps / steps_per_epoch if steps_per_epoch else float("inf")
        length = f"{steps} steps (train.max_steps; {epochs:.3g} x {steps_per_epoch} steps/epoch)"
    else:
        steps = steps_per_epoch * train.epochs
        length = f"{steps} steps = {train.epochs} x {steps_per_epoch} steps/epoch (train.epochs)"
    lr = scaled_lr(optim, batch.samples)
    scaling = f"{optim.lr:g} x {batch.samples}/256, " if optim.scale_lr else ""
    warmup = f", {optim.warmup_steps} warm-up steps" if optim.warmup_steps else ""
    every = f"every {train.ckpt_every} steps and " if train.ckpt_every else ""
    return (
        f"plan: {length}; global batch {batch.samples} = {batch.per_rank}/rank x {batch.ranks} ranks x "
        f"{batch.accumulation} accumulation; lr {lr:.4g} ({optim.name}, {scaling}{optim.schedule}{warmup}); "
        f"checkpoints {every}at the end, the last {train.keep_checkpoints} kept, in "
        f"{run.checkpoints}; {exported(train.export, val, run)}"
    )


def exported(export: str, val: ValConfig, run: RunDir) -> str:
    """What the run validates (``val``) and which backbone it exports (``train.export``)."""
    if not val.every:
        return f"{run.backbone}: the last step's backbone"
    samples = "all" if val.max_samples is None else f"at most {val.max_samples}"
    checks = (
        f"validation loss every {val.every} steps and at the last on {samples} samples of split "
        f"{val.split!r} ({val.views} views), the lowest val_{val.select}'s backbone in {run.best_backbone}"
    )
    if export == "best":
        return f"{checks}; {run.backbone}: that best backbone (train.export=best), {RunDir.last_backbone.name} the last"
    return f"{checks}; {run.backbone}: the last step's backbone (train.export=last)"
