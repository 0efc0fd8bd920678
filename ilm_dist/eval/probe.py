"""Layer-wise probing: a linear classifier on the pooled output of each frozen block (Kaku et al. 2021, Sec. 5).

The backbone runs once per split in eval mode (no augmentation) and its pooled block features are
cached (``features_<split>.npz``); each block's linear layer is then trained on standardised features
with Adam (lr 1e-3, official probing code), selected on validation, scored on test (the test
probabilities of every block are saved in ``predictions.npz``). The backbone's
full ``state_dict`` (weights and BatchNorm statistics) is hashed before and after; any change fails.
Outputs in ``EVAL_DIR/<method>/probe/f<fraction>/``.

Under the ``deepspeed`` launcher the features are extracted sharded over the ranks and gathered, so
every rank holds all of them; every rank then fits the same linear heads (rather than waiting in a
collective while rank 0 alone fits, which on a large set could outlast ``engine.collective_timeout_s``),
and rank 0 alone writes.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ilm_dist.distributed import on_main
from ilm_dist.eval.context import SPLITS, EvalContext, saved_or_computed
from ilm_dist.eval.fit import ADAM_LR, fit, fit_option, predict, torch_threads, val_score
from ilm_dist.eval.metrics import evaluate_predictions, probabilities
from ilm_dist.eval.store import probe_result_dir, read_json, save_npz, write_json
from ilm_dist.eval.subsets import load_or_draw_subset
from ilm_dist.eval.weights import assert_unchanged, fingerprint
from ilm_dist.model.encoder import BLOCK_NODES
from ilm_dist.options import check_bounds, option

log = logging.getLogger("ilm_dist")

PREDICTIONS = "predictions.npz"  # test labels and each block's test probabilities (block<i>_probs)


@dataclass
class ProbeSettings:
    fraction: float = field(
        default=1.0,
        metadata=option(
            "labelled fraction of the train split (a saved subset, as for fine-tuning)", above=0, max=1
        ),
    )
    epochs: int = fit_option("epochs", 100)
    min_steps: int = fit_option("min_steps", 0)
    batch_size: int = fit_option("batch_size", 256)
    lr: float = fit_option("lr", ADAM_LR)
    evals: int = fit_option("evals", 20)
    seed: int = fit_option("seed", 0)
    n_boot: int = fit_option("n_boot", 1000)

    def __post_init__(self) -> None:
        check_bounds(self)


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


def probe_block(
    ctx: EvalContext, feats: dict, block: str, settings: ProbeSettings
) -> tuple[dict, np.ndarray]:
    """The block's test metrics record and its test logits."""
    train = feats["train"][block]
    mean, std = train.mean(axis=0), train.std(axis=0)
    std[std < 1e-6] = 1.0  # dead (constant) features stay zero after centring
    data = {s: _tensors(feats[s][block], feats[s]["labels"], mean, std) for s in SPLITS}
    torch.manual_seed(settings.seed)
    head = nn.Linear(train.shape[1], ctx.manifest.num_classes).to(ctx.device)
    generator = torch.Generator().manual_seed(settings.seed)
    loader = DataLoader(
        data["train"],
        batch_size=min(settings.batch_size, len(train)),
        shuffle=True,
        drop_last=True,
        generator=generator,
    )
    val, test = (DataLoader(data[s], batch_size=4096) for s in ("val", "test"))
    steps = max(settings.epochs * len(loader), settings.min_steps)
    result = fit(
        head,
        head,
        loader,
        ctx.task,
        steps,
        settings.evals,
        lambda: val_score(head, val, ctx.device, ctx.task, ctx.class_names),
        ctx.device,
        settings.lr,
    )
    logits, labels = predict(head, test, ctx.device)
    record = {
        "fit": asdict(result),
        **evaluate_predictions(ctx.task, labels, logits, ctx.class_names, settings.n_boot, settings.seed),
    }
    return record, logits


def probe(ctx: EvalContext, settings: ProbeSettings, force: bool = False) -> dict:
    """Probe every block of the initial weights (or return the saved result)."""
    out = probe_dir(ctx, settings.fraction)
    path = out / "metrics.json"
    saved = on_main(lambda: read_json(path) if path.is_file() and not force else None)
    if saved is not None:  # rank 0 decides, so every rank takes the same branch
        log.info("%s: already done (use --force to recompute)", out)
        return saved
    subset = on_main(
        lambda: load_or_draw_subset(ctx.eval_dir, ctx.manifest, "train", settings.fraction, settings.seed)
    )
    backbone = ctx.classifier()
    before = fingerprint(backbone)
    feats = cached_features(ctx, backbone, out, subset["indices"], force)
    blocks, probs = {}, {}
    with torch_threads(1):
        for i in range(1, len(BLOCK_NODES) + 1):
            log.info("%s: probing block %d", ctx.name, i)
            blocks[f"block{i}"], logits = probe_block(ctx, feats, f"block{i}", settings)
            probs[f"block{i}_probs"] = probabilities(ctx.task, logits)
    assert_unchanged(backbone, before, f"probing {ctx.name}")
    record = {
        "method": ctx.name,
        "kind": "probe",
        "fraction": settings.fraction,
        "task": ctx.task,
        "class_names": list(ctx.class_names),
        "dataset_id": subset["dataset_id"],
        "subset": {"digest": subset["digest"], "num_samples": subset["num_samples"]},
        "test": {"num_samples": len(feats["test"]["labels"]), "digest": ctx.test_digest},
        "classes_without_samples": ctx.classes_without_samples(),
        "backbone_sha256": before,
        "settings": asdict(settings),
        "blocks": blocks,
    }
    on_main(lambda: save_npz(out / PREDICTIONS, labels=feats["test"]["labels"], **probs))
    on_main(lambda: write_json(path, record))
    return record
