"""The one-line plan every pretraining run logs at its start (and the dry run prints)."""

from __future__ import annotations

from ilm_dist.config import RunConfig
from ilm_dist.train.optim import scaled_lr
from ilm_dist.train.run_dir import RunDir


def training_plan(cfg: RunConfig, steps_per_epoch: int, world: int, accum: int) -> str:
    """One line: length, global batch, LR after scaling and what the run saves (logged at every start).

    ``steps_per_epoch`` counts optimizer steps (loader batches per rank // ``accum``).
    """
    global_batch = cfg.data.batch_size * world * accum
    if cfg.train.max_steps is not None:
        steps = cfg.train.max_steps
        epochs = steps / steps_per_epoch if steps_per_epoch else float("inf")
        length = f"{steps} steps (train.max_steps; {epochs:.3g} x {steps_per_epoch} steps/epoch)"
    else:
        steps = steps_per_epoch * cfg.train.epochs
        length = f"{steps} steps = {cfg.train.epochs} x {steps_per_epoch} steps/epoch (train.epochs)"
    optim = cfg.optim
    lr = scaled_lr(optim, global_batch)
    scaling = f"{optim.lr:g} x {global_batch}/256, " if optim.scale_lr else ""
    warmup = f", {optim.warmup_steps} warm-up steps" if optim.warmup_steps else ""
    every = f"every {cfg.train.ckpt_every} steps and " if cfg.train.ckpt_every else ""
    return (
        f"plan: {length}; global batch {global_batch} = {cfg.data.batch_size}/rank x {world} ranks x "
        f"{accum} accumulation; lr {lr:.4g} ({optim.name}, {scaling}{optim.schedule}{warmup}); "
        f"checkpoints {every}at the end, the last {cfg.train.keep_checkpoints} kept, in "
        f"{RunDir(cfg.output_dir).checkpoints}; {exported(cfg)}"
    )


def exported(cfg: RunConfig) -> str:
    """What the run validates and which backbone it exports (``val``, ``train.export``)."""
    run, val = RunDir(cfg.output_dir), cfg.val
    if not val.every:
        return f"{run.backbone}: the last step's backbone"
    samples = "all" if val.max_samples is None else f"at most {val.max_samples}"
    checks = (
        f"validation loss every {val.every} steps and at the last on {samples} samples of split "
        f"{val.split!r} ({val.views} views), the lowest val_{val.select}'s backbone in {run.best_backbone}"
    )
    if cfg.train.export == "best":
        return f"{checks}; {run.backbone}: that best backbone (train.export=best), {RunDir.last_backbone.name} the last"
    return f"{checks}; {run.backbone}: the last step's backbone (train.export=last)"
