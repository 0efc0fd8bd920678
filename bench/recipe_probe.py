"""Val-split check of a pretraining recipe: never opens the test split.

For a backbone (a run directory, backbone.pt, or ``random``), the pooled block 1-4 features of the train
and val splits (eval transform of the run config), and for each label fraction and label-subset seed a
logistic regression per block (scikit-learn, features standardised on the labelled subset) fitted on the
stratified labelled subset and scored on val: ROC AUC (binary), macro AUC (multi-label). With
``--weights colour`` the features are the six per-channel means and standard deviations of the image (no
network): what a probe gets from colour alone. Prints a table; writes JSON with device, commit, command.

    python bench/recipe_probe.py --weights RUN_DIR|backbone.pt|random|colour --config CFG [key=value ...]
        [--fractions 0.01 0.06 1.0] [--subsets 5] [--out bench/results/recipe_probe.json]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from common import add_val_split_arguments, val_split_record, write_result
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from ilm_dist.config import load_config
from ilm_dist.data.manifest import Manifest, load_manifest
from ilm_dist.data.shard_reader import ShardReader
from ilm_dist.eval.features import extract_block_features
from ilm_dist.eval.subsets import stratified_subset
from ilm_dist.eval.weights import build_classifier, load_state, resolve_init

SPLITS = ("train", "val")  # the test split is never read


def colour_statistics(manifest: Manifest, split: str) -> tuple[list[np.ndarray], np.ndarray]:
    """Per-channel mean and standard deviation of every image of ``split`` (one 'block'), and the labels."""
    reader = ShardReader(manifest, split)
    rows, labels = [], []
    for i in range(len(reader)):
        image = np.asarray(reader.image(i).convert("RGB"), dtype=np.float32) / 255
        rows.append(np.concatenate([image.mean((0, 1)), image.std((0, 1))]))
        labels.append(reader.label(i))
    return [np.stack(rows)], np.squeeze(np.stack(labels))


def block_features(weights: str, cfg, manifest: Manifest) -> dict[str, tuple[list[np.ndarray], np.ndarray]]:
    """Each split's per-block feature matrices and labels."""
    if weights == "colour":
        return {split: colour_statistics(manifest, split) for split in SPLITS}
    torch.manual_seed(cfg.seed)
    state = load_state(resolve_init(weights))
    model = build_classifier(cfg.model.arch, state, manifest.num_classes, weights, cfg.model.stem)
    out = {}
    for split in SPLITS:
        feats = extract_block_features(
            model, manifest, split, cfg.aug, cfg.data.image_size, torch.device("cpu"), batch_size=256
        )
        out[split] = (list(feats.blocks), feats.labels)
    return out


def probe_auc(train: np.ndarray, train_labels: np.ndarray, val: np.ndarray, val_labels: np.ndarray) -> float:
    """Val AUC of a standardised logistic regression (one per finding for multi-label, macro mean)."""
    scaler = StandardScaler().fit(train)
    x_train, x_val = scaler.transform(train), scaler.transform(val)
    columns = train_labels.reshape(len(train_labels), -1)  # [N] binary labels: one column
    val_columns = val_labels.reshape(len(val_labels), -1)
    aucs = []
    for c in range(columns.shape[1]):
        clf = LogisticRegression(C=1.0, max_iter=2000).fit(x_train, columns[:, c])
        aucs.append(roc_auc_score(val_columns[:, c], clf.predict_proba(x_val)[:, 1]))
    return float(np.mean(aucs))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", required=True, help="run dir, backbone.pt, random, or colour")
    add_val_split_arguments(parser)
    parser.add_argument("--subsets", type=int, default=5, help="label subsets per fraction below 1")
    args = parser.parse_args(argv)
    start = time.time()
    cfg = load_config(args.config, args.overrides)
    manifest = load_manifest(cfg.data.shards)
    feats = block_features(args.weights, cfg, manifest)
    (train_blocks, train_labels), (val_blocks, val_labels) = feats["train"], feats["val"]
    val_auc = {}
    for fraction in args.fractions:
        for block, (train, val) in enumerate(zip(train_blocks, val_blocks, strict=True), start=1):
            seeds = range(args.subsets if fraction < 1 else 1)
            aucs = []
            for seed in seeds:
                idx = stratified_subset(train_labels, fraction, seed, manifest.class_names)
                aucs.append(probe_auc(train[idx], train_labels[idx], val, val_labels))
            val_auc[f"f{fraction:g}_b{block}"] = {"mean": float(np.mean(aucs)), "all": aucs}
        means = [val_auc[f"f{fraction:g}_b{b}"]["mean"] for b in range(1, len(train_blocks) + 1)]
        print(f"val AUC at {fraction:g} of the labels, per block: " + " ".join(f"{m:.4f}" for m in means))
    result = {
        **val_split_record("recipe_probe.py", argv, start, args.config, args.overrides),
        "weights": args.weights,
        "val_auc": val_auc,
    }
    if args.out:
        write_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
