"""Loss-curve parity of bench/pretrain_throughput.py (``--curve-steps``): ilm_dist against the usual way.

The baseline (bench/moco_baseline.py) and ilm_dist's Trainer start from the same initial weights, key
encoder and queue and train on the same batches, the baseline in ilm_dist's precision (bf16 autocast
against DeepSpeed bf16; fp32 against fp32, where the curves agree to rounding). The report is each loss
term's mean absolute difference relative to its mean magnitude, next to the noise reference: the same
difference between the baseline and the baseline from seed + 1 (other initial weights, queue, batch order
and augmentations), an equally valid run of the same method.
"""

from __future__ import annotations

import dataclasses
import statistics

import torch
from common import release
from moco_baseline import Baseline, baseline_batches, baseline_precision

from ilm_dist.config import RunConfig
from ilm_dist.data import TwoViewBatch
from ilm_dist.train.trainer import Trainer


def loss_curve(cfg: RunConfig, device: torch.device, steps: int, tolerance: float) -> dict:
    """Per-term relative differences of ilm_dist from the baseline over ``steps`` steps, and the noise."""
    curves, precision, dtype = side_by_side(cfg, device, steps)
    release(device)
    curves["baseline_other_seed"] = other_seed_curve(cfg, device, dtype, steps)
    release(device)
    terms = {term: compare(values, curves["ilm_dist"][term]) for term, values in curves["baseline"].items()}
    noise = {
        term: compare(values, curves["baseline_other_seed"][term])
        for term, values in curves["baseline"].items()
    }
    return {
        "steps": steps,
        "precision": precision,
        "relative": terms["loss"]["relative"],
        "match": terms["loss"]["relative"] <= tolerance,
        "tolerance": tolerance,
        "terms": terms,
        "noise": noise,
        "noise_definition": "the same comparison between the baseline and the baseline run again with seed + 1 "
        "(other initial weights and queue, other batch order and augmentations)",
        "within_noise": all(terms[t]["mean_abs_diff"] <= noise[t]["mean_abs_diff"] for t in terms),
        "loss": {name: [round(v, 5) for v in curve["loss"]] for name, curve in curves.items()},
    }


def side_by_side(
    cfg: RunConfig, device: torch.device, steps: int
) -> tuple[dict[str, dict[str, list[float]]], str, torch.dtype]:
    """Per-step loss terms of the baseline (in ilm_dist's precision) and ilm_dist on the same batches."""
    trainer = Trainer(cfg)
    baseline = Baseline(cfg, device, trainer.dtype)
    baseline.load_from(trainer)
    batches = baseline_batches(cfg, device)
    curves: dict[str, dict[str, list[float]]] = {"baseline": {}, "ilm_dist": {}}
    for _ in range(steps):
        view1, view2 = next(batches)
        index = torch.arange(len(view1))
        runs = {
            "baseline": baseline.step([view1, view2]),
            "ilm_dist": trainer.train_step(TwoViewBatch(view1, view2, torch.zeros_like(index), index)),
        }
        for name, terms in runs.items():
            for term, value in terms.items():
                curves[name].setdefault(term, []).append(float(value.detach()))
    return curves, baseline_precision(trainer.dtype), trainer.dtype


def other_seed_curve(
    cfg: RunConfig, device: torch.device, dtype: torch.dtype, steps: int
) -> dict[str, list[float]]:
    """The noise reference: the baseline's loss terms from seed + 1, an equally valid run of the same method."""
    other = dataclasses.replace(cfg, seed=cfg.seed + 1)
    torch.manual_seed(other.seed)
    baseline, batches = Baseline(other, device, dtype), baseline_batches(other, device)
    curve: dict[str, list[float]] = {}
    for _ in range(steps):
        for term, value in baseline.step(next(batches)).items():
            curve.setdefault(term, []).append(float(value.detach()))
    return curve


def compare(reference: list[float], other: list[float]) -> dict[str, float]:
    mad = statistics.fmean(abs(a - b) for a, b in zip(reference, other, strict=True))
    scale = statistics.fmean(abs(a) for a in reference)
    return {"mean_abs_diff": mad, "scale": scale, "relative": mad / scale if scale else float("nan")}
