"""What every evaluation command shares: config, data, initial weights and the method's output directory."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ilm_dist.config import RunConfig, load_config
from ilm_dist.data.manifest import Manifest, load_manifest
from ilm_dist.data.shards import ShardReader
from ilm_dist.eval.errors import EvalError
from ilm_dist.eval.features import BlockFeatures, block_extractor, eval_loader, run_blocks
from ilm_dist.eval.store import dataset_id, digest, load_npz, read_json, save_npz, write_json
from ilm_dist.eval.weights import InitSpec, build_classifier, check_fits, load_state, resolve_init
from ilm_dist.model.encoder import build_resnet

SPLITS = ("train", "val", "test")
SOURCE = "source.json"
# keys of source.json that must agree when a method directory is reused
SOURCE_IDENTITY = ("weights", "arch", "dataset_id", "image_size")


@dataclass
class EvalContext:
    cfg: RunConfig
    manifest: Manifest
    init: InitSpec
    state: dict[str, Tensor] | None
    eval_dir: Path
    name: str
    device: torch.device
    num_workers: int = 0
    batch_size: int = 128  # for inference

    @property
    def method_dir(self) -> Path:
        return self.eval_dir / self.name

    @property
    def task(self) -> str:
        return self.manifest.task

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.manifest.class_names

    def reader(self, split: str) -> ShardReader:
        return ShardReader(self.manifest, split)

    @cached_property
    def test_digest(self) -> str:
        reader = self.reader("test")
        return digest([reader.key(i) for i in range(len(reader))])

    def classifier(self) -> torch.nn.Module:
        """The ResNet with the initial weights and a fresh ``fc`` (one output per class), on the device.

        Seeded with the run's seed, so a random initialisation is the same network every time.
        """
        torch.manual_seed(self.cfg.seed)
        source = str(self.init.path or self.init.spec)
        return build_classifier(self.cfg.model.arch, self.state, self.manifest.num_classes, source).to(
            self.device
        )

    def features(
        self, resnet: torch.nn.Module, split: str, indices=None, with_logits: bool = False
    ) -> BlockFeatures:
        loader = eval_loader(
            self.reader(split),
            self.cfg.aug,
            self.cfg.data.image_size,
            self.batch_size,
            self.num_workers,
            indices,
        )
        return run_blocks(block_extractor(resnet, with_logits), loader, self.device)

    def source_record(self, config_path: Path) -> dict:
        return {
            "name": self.name,
            "weights": self.init.describe(),
            "arch": self.cfg.model.arch,
            "config": str(config_path),
            "data": str(self.manifest.root),
            "dataset_id": dataset_id(self.manifest),
            "task": self.task,
            "class_names": list(self.class_names),
            "image_size": self.cfg.data.image_size,
            "test_digest": self.test_digest,
        }


def open_context(
    weights: str,
    config: str | None,
    overrides: list[str],
    eval_dir: str | Path,
    name: str | None,
    device: torch.device,
    num_workers: int = 0,
) -> EvalContext:
    """Resolve weights and config, load the data manifest, check the weights fit, claim ``EVAL_DIR/<name>``."""
    init = resolve_init(weights)
    config_path = Path(config) if config else init.run_config
    if config_path is None:
        raise EvalError(
            f"--weights {weights}: no run config.yaml beside it; pass --config (a run config naming "
            "model.arch, data.shards, data.image_size and aug), e.g. --config configs/idc/moco.yaml"
        )
    cfg = load_config(config_path, overrides)
    if cfg.data.shards is None:
        raise EvalError(f"{config_path}: data.shards is not set (evaluation needs a packed dataset)")
    manifest = load_manifest(cfg.data.shards)
    for split in SPLITS:
        manifest.split(split)
    state = load_state(init)
    if state is not None:
        check_fits(build_resnet(cfg.model.arch), state, cfg.model.arch, str(init.path))
    ctx = EvalContext(
        cfg, manifest, init, state, Path(eval_dir), name or default_name(init, cfg), device, num_workers
    )
    claim_method_dir(ctx, config_path)
    return ctx


def default_name(init: InitSpec, cfg: RunConfig) -> str:
    if init.kind == "random":
        return "random_init"
    return cfg.name if init.run_config is not None else init.path.stem


def claim_method_dir(ctx: EvalContext, config_path: Path) -> None:
    """Write ``source.json``, or check that the existing one describes the same weights and data."""
    record = ctx.source_record(config_path)
    path = ctx.method_dir / SOURCE
    if path.is_file():
        old = read_json(path)
        diff = [k for k in SOURCE_IDENTITY if old.get(k) != record[k]]
        if diff:
            raise EvalError(
                f"{path} describes another evaluation ({', '.join(f'{k}: {old.get(k)} vs {record[k]}' for k in diff)}); "
                "pass another --name or remove that directory"
            )
    write_json(path, record)


def init_test_features(ctx: EvalContext, force: bool = False) -> dict[str, np.ndarray]:
    """Block features of the test split before fine-tuning (cached in ``init_features_test.npz``)."""
    path = ctx.method_dir / "init_features_test.npz"
    if path.is_file() and not force:
        return load_npz(path)
    feats = ctx.features(ctx.classifier(), "test")
    arrays = {f"block{i}": b for i, b in enumerate(feats.blocks, start=1)} | {"labels": feats.labels}
    save_npz(path, **arrays)
    return arrays
