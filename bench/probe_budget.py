"""Val curves of the block probe: how many Adam steps the experiments' linear head on cached features needs.

For each encoder in ``--weights`` (a run directory, backbone.pt or ``random``), the pooled block features of
the train and val splits (as ``bench/recipe_probe.py`` extracts them; the test split is never read), and for
each label fraction and block: the linear head of the experiments' probe (:func:`ilm_dist.eval.probe.fit_head`:
features standardised on the labelled subset of seed 0, Adam, batch ``min(--batch-size, subset)``), trained
for ``--steps`` steps with the val AUC at ``--checks`` points;
beside it the val AUC of scikit-learn's L2 logistic regression (``recipe_probe.probe_auc``), a converged fit.

    python bench/probe_budget.py --weights RUN_DIR random --config CFG [key=value ...]
        [--fractions 0.01 0.06 1.0] [--blocks 1 4] [--steps 3000] [--checks 10] [--out FILE]
"""

from __future__ import annotations

import argparse
import time

import torch
from common import add_val_split_arguments, val_split_record, write_result
from recipe_probe import block_features, probe_auc

from ilm_dist.config import load_config
from ilm_dist.data.manifest import load_manifest
from ilm_dist.eval.probe import fit_head
from ilm_dist.eval.settings import ProbeSettings
from ilm_dist.eval.subsets import stratified_subset

CPU = torch.device("cpu")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", nargs="+", required=True, help="run dirs, backbone.pt files or random")
    add_val_split_arguments(parser)
    parser.add_argument("--blocks", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--checks", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args(argv)
    start = time.time()
    cfg = load_config(args.config, args.overrides)
    manifest = load_manifest(cfg.data.shards)
    if manifest.task != "binary":
        parser.error(f"{cfg.data.shards}: a {manifest.task} dataset; this script scores binary tasks only")
    settings = ProbeSettings(
        epochs=1, min_steps=args.steps, evals=args.checks, lr=args.lr, batch_size=args.batch_size, seed=0
    )
    curves = {}
    for weights in args.weights:
        feats = block_features(weights, cfg, manifest)
        (train_blocks, train_labels), (val_blocks, val_labels) = feats["train"], feats["val"]
        for fraction in args.fractions:
            idx = stratified_subset(train_labels, fraction, 0, manifest.class_names)
            for block in args.blocks:
                train, val = train_blocks[block - 1][idx], val_blocks[block - 1]
                labelled = (train, train_labels[idx])
                _, fitted, _ = fit_head(
                    labelled, (val, val_labels), settings, "binary", manifest.class_names, CPU
                )
                history = fitted.history
                sklearn = probe_auc(*labelled, val, val_labels)
                key = f"{weights}/f{fraction:g}/b{block}"
                curves[key] = {
                    "steps": [h["step"] for h in history],
                    "val": [h["val"] for h in history],
                    "sklearn_val": sklearn,
                }
                print(
                    f"{key}: "
                    + " ".join(f"{h['step']}:{h['val']:.3f}" for h in history)
                    + f"; sklearn {sklearn:.3f}"
                )
    result = {
        **val_split_record("probe_budget.py", argv, start, args.config, args.overrides),
        "curves": curves,
    }
    if args.out:
        write_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
