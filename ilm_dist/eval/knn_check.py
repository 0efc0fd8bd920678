"""kNN accuracy of a pretrained backbone vs a randomly initialised one, per block, on held-out data."""

from __future__ import annotations

import json

import torch

from ilm_dist.config import ConfigError, load_config
from ilm_dist.cpu_placement import place_this_process
from ilm_dist.data.manifest import ManifestError, load_manifest
from ilm_dist.errors import ArgumentParser, fail
from ilm_dist.eval.features import extract_block_features
from ilm_dist.eval.knn import knn_accuracy
from ilm_dist.eval.weights import build_classifier, load_state, resolve_init
from ilm_dist.model.encoder import build_resnet
from ilm_dist.train.engine import forward_dtype
from ilm_dist.train.run_dir import RunDir

CPU = torch.device("cpu")


def block_knn_accuracies(
    resnet, manifest, cfg, dtype: torch.dtype, bank_split: str, split: str
) -> list[float]:
    """Per block, the kNN accuracy on ``split`` with neighbours from ``bank_split``, the forward computed
    as the run trained: in ``dtype`` (autocast) and channels-last where ``model.channels_last``."""
    if cfg.model.channels_last:
        resnet = resnet.to(memory_format=torch.channels_last)
    args = (cfg.aug, cfg.data.image_size, CPU)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        bank = extract_block_features(resnet, manifest, bank_split, *args)
        test = extract_block_features(resnet, manifest, split, *args)
    return [
        knn_accuracy(b, bank.labels, t, test.labels) for b, t in zip(bank.blocks, test.blocks, strict=True)
    ]


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--run", required=True, help="pretraining output_dir (config.yaml + backbone.pt)")
    parser.add_argument("--bank-split", default="train", help="labelled split the neighbours come from")
    parser.add_argument("--split", default="test", help="held-out split to classify")
    args = parser.parse_args(argv)
    run = RunDir(args.run)
    try:
        cfg = load_config(run.config)
        manifest = load_manifest(cfg.data.shards)
        if manifest.task == "multilabel":
            raise ManifestError(
                f"{cfg.data.shards}: knn_check's kNN needs single-label data, task is multilabel"
            )
        dtype = forward_dtype(cfg.engine, cfg.data.batch_size, CPU)
        state = load_state(resolve_init(str(run.root)))
        trained = build_classifier(cfg.model.arch, state, 1000, str(run.root), cfg.model.stem)
    except (ConfigError, ManifestError, FileNotFoundError, ValueError) as err:
        fail(str(err))
    layout = "channels-last" if cfg.model.channels_last else "NCHW"
    print(
        f"cpu placement: {place_this_process(0, cfg.cpu, announce=False).describe()}; forward: {dtype}, {layout}"
    )
    torch.manual_seed(cfg.seed + 1)
    results = {
        "trained": block_knn_accuracies(trained, manifest, cfg, dtype, args.bank_split, args.split),
        "random_init": block_knn_accuracies(
            build_resnet(cfg.model.arch, stem=cfg.model.stem),
            manifest,
            cfg,
            dtype,
            args.bank_split,
            args.split,
        ),
    }
    run.knn_check.write_text(json.dumps(results | vars(args) | {"forward": f"{dtype}, {layout}"}, indent=2))
    print(f"kNN accuracy (k=20) on '{args.split}', neighbours from '{args.bank_split}' of {cfg.data.shards}:")
    print(f"{'block':>8} {'trained':>9} {'random':>9}")
    for i, (a, b) in enumerate(zip(results["trained"], results["random_init"], strict=True), start=1):
        print(f"{i:>8} {a:>9.3f} {b:>9.3f}")
    print(f"chance: {1 / manifest.num_classes:.3f}; written to {run.knn_check}")
