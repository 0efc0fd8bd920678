"""Val curves of fine-tuning: how many optimizer steps the linear head (or the whole network) needs.

For each encoder in ``--weights`` (a run directory, backbone.pt or ``random``), label fraction and label
subset (stratified, seeds ``0..--subsets-1``), the fine-tuning loop of ``python -m ilm_dist.eval finetune``
(:func:`ilm_dist.eval.finetune.train_on_subset`: Adam, the run's MoCo augmentations as training views; for
``--mode linear`` a frozen backbone, its BatchNorm in eval mode unless ``--frozen-bn train``) runs ``--steps``
steps and scores the val split ``--checks`` times. The test split is never read. Prints, per encoder and fraction, the mean val metric over the subsets at each
check and the first check within ``--tolerance`` of the curve's best (where more steps stopped paying);
writes JSON (device, commit, command, every curve) and, with ``--plot``, a figure of the curves.

    python bench/eval_budget.py --weights RUN_DIR random --config CFG --mode linear --lr 0.01 \
        --fractions 0.01 0.06 1.0 --subsets 3 --steps 600 --checks 12 [key=value ...] \
        [--out bench/results/eval_budget.json] [--plot curves.png]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import add_val_split_arguments, val_split_record, write_result

from ilm_dist.config import load_config
from ilm_dist.data.manifest import load_manifest
from ilm_dist.eval.context import EvalContext
from ilm_dist.eval.finetune import train_on_subset
from ilm_dist.eval.metrics import check_metric
from ilm_dist.eval.settings import FinetuneSettings
from ilm_dist.eval.subsets import load_or_draw_subset
from ilm_dist.eval.weights import load_state, resolve_init


def val_curve(ctx: EvalContext, fraction: float, settings: FinetuneSettings) -> list[dict]:
    """One fine-tuning run's validation history: ``[{"step", "train_loss", "val"}, ...]``."""
    subset = load_or_draw_subset(ctx.eval_dir, ctx.manifest, "train", fraction, settings.seed)
    return train_on_subset(ctx, subset["indices"], settings)[1].history


def plateau_step(steps: list[int], means: list[float], tolerance: float) -> int:
    """The first check whose mean val metric is within ``tolerance`` of the best check's."""
    best = max(means)
    return next(s for s, m in zip(steps, means, strict=True) if m >= best - tolerance)


def encoder_context(weights: str, cfg, manifest, eval_dir: Path) -> EvalContext:
    init = resolve_init(weights)
    name = "random_init" if weights == "random" else Path(weights).name
    return EvalContext(cfg, manifest, init, load_state(init), eval_dir, name, torch.device("cpu"))


def plot_curves(curves: dict, path: Path, metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fractions = sorted({c["fraction"] for c in curves.values()})
    fig, axes = plt.subplots(1, len(fractions), figsize=(4 * len(fractions), 3.2), squeeze=False)
    for ax, fraction in zip(axes[0], fractions, strict=True):
        for curve in curves.values():
            if curve["fraction"] == fraction:
                ax.plot(curve["steps"], curve["mean"], marker=".", label=curve["weights"])
        ax.set(title=f"{fraction:g} of the labels", xlabel="optimizer steps", ylabel=f"val {metric}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", nargs="+", required=True, help="run dirs, backbone.pt files or random")
    add_val_split_arguments(parser)
    parser.add_argument("--mode", choices=("linear", "full"), default="linear")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--subsets", type=int, default=3, help="label subsets per fraction below 1")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--checks", type=int, default=12, help="val checks, evenly over the steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--frozen-bn", choices=("eval", "train"), default="eval", help="as the finetune command's"
    )
    parser.add_argument("--tolerance", type=float, default=0.005, help="'no longer changes': within this")
    parser.add_argument("--plot", type=Path, default=None, help="PNG of the mean curves")
    args = parser.parse_args(argv)
    start = time.time()
    cfg = load_config(args.config, args.overrides)
    manifest = load_manifest(cfg.data.shards)
    metric = check_metric(None, manifest.task, "--select")
    curves = {}
    with tempfile.TemporaryDirectory() as eval_dir:
        for weights in args.weights:
            ctx = encoder_context(weights, cfg, manifest, Path(eval_dir))
            for fraction in args.fractions:
                runs = []
                for seed in range(args.subsets if fraction < 1 else 1):
                    settings = FinetuneSettings(
                        mode=args.mode,
                        epochs=1,
                        min_steps=args.steps,
                        evals=args.checks,
                        lr=args.lr,
                        batch_size=args.batch_size,
                        seed=seed,
                        n_boot=0,
                        frozen_bn=args.frozen_bn,
                    )
                    runs.append(val_curve(ctx, fraction, settings))
                steps = [point["step"] for point in runs[0]]
                per_subset = [[point["val"] for point in run] for run in runs]
                mean = np.mean(per_subset, axis=0).tolist()
                enough = plateau_step(steps, mean, args.tolerance)
                curves[f"{ctx.name}/f{fraction:g}"] = {
                    "weights": weights,
                    "fraction": fraction,
                    "steps": steps,
                    "mean": mean,
                    "per_subset": per_subset,
                    "plateau_step": enough,
                }
                print(
                    f"{ctx.name} at {fraction:g}: val {metric} "
                    + " ".join(f"{s}:{m:.3f}" for s, m in zip(steps, mean, strict=True))
                    + f"; within {args.tolerance} of the best from step {enough}"
                )
    result = {
        **val_split_record("eval_budget.py", argv, start, args.config, args.overrides),
        "mode": args.mode,
        "lr": args.lr,
        "frozen_bn": args.frozen_bn,
        "metric": metric,
        "curves": curves,
    }
    if args.plot:
        plot_curves(curves, args.plot, metric)
    if args.out:
        write_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
