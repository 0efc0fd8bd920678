"""Pooled block features (and logits) of a ResNet over a split of a packed dataset.

Images come through the same :class:`ShardReader` and transforms as pretraining; features are the
global-average-pooled outputs of layer1..layer4 ("Block 1..4" in Kaku et al. 2021, as in the
official code's ``avgpool`` of each block).

Under the ``deepspeed`` launcher a split is cut into the batches one process would run, each rank runs
a contiguous range of whole batches (:func:`rank_shard`) and the rows of all ranks are gathered in rank
order (:func:`sharded_rows`): every sample is computed once, in the same batch as in one process, and
every rank ends with the full result in the original sample order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision.models.feature_extraction import create_feature_extractor

from ilm_dist.config import AugConfig
from ilm_dist.data.augment import eval_transform
from ilm_dist.data.manifest import Manifest
from ilm_dist.data.sampling import rank_shard
from ilm_dist.data.shard_format import squeeze_labels
from ilm_dist.data.shard_reader import ShardReader
from ilm_dist.data.torch_backend import SplitDataset
from ilm_dist.distributed import all_gather_object, rank, world_size
from ilm_dist.model.encoder import BLOCK_NODES


def sharded_rows(
    run: Callable[[Sequence[int]], dict[str, np.ndarray]], order: Sequence[int], batch_size: int
) -> dict[str, np.ndarray]:
    """``run`` on this rank's :func:`rank_shard` of ``order``, rows of all ranks concatenated in ``order``.

    ``run(indices)`` returns arrays with one row per index. Every rank gets the full result; in one
    process this is just ``run(order)``.
    """
    part = order[rank_shard(len(order), batch_size, rank(), world_size())]
    parts = [p for p in all_gather_object(run(part) if len(part) else None) if p is not None]
    if len(parts) == 1:
        return parts[0]
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def eval_loader(
    reader: ShardReader,
    aug: AugConfig,
    image_size: int,
    batch_size: int = 128,
    num_workers: int = 0,
    indices: Sequence[int] | None = None,
) -> DataLoader:
    """Deterministic views (resize + normalise) in a fixed order."""
    dataset = SplitDataset(reader, eval_transform(aug, image_size), indices)
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=dataset.collate)


@dataclass
class BlockFeatures:
    blocks: list[np.ndarray]  # per block 1..4: [N, C_i], global-average-pooled
    labels: np.ndarray  # [N] class index or [N, C] multi-hot
    logits: np.ndarray | None = None  # [N, num_outputs] when the extractor returns them

    def arrays(self) -> dict[str, np.ndarray]:
        """``{"block1".."block4", "labels"[, "logits"]}``: the names used in the saved ``.npz`` files."""
        named = {f"block{i}": b for i, b in enumerate(self.blocks, start=1)} | {"labels": self.labels}
        return named if self.logits is None else named | {"logits": self.logits}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> BlockFeatures:
        blocks = [arrays[f"block{i}"] for i in range(1, len(BLOCK_NODES) + 1)]
        return cls(blocks, arrays["labels"], arrays.get("logits"))


def block_extractor(resnet: nn.Module, with_logits: bool = False) -> nn.Module:
    """A module returning ``{"layer1".."layer4"[, "logits"]}`` for a torchvision ResNet (shares its weights)."""
    nodes = {name: name for name in BLOCK_NODES} | ({"fc": "logits"} if with_logits else {})
    return create_feature_extractor(resnet, return_nodes=nodes)


@torch.no_grad()
def run_blocks(extractor: nn.Module, loader: DataLoader, device: torch.device) -> BlockFeatures:
    """Run a dict-returning extractor in eval mode over ``loader``; its train/eval mode is restored."""
    was_training = extractor.training
    extractor.eval()
    dtype = next(extractor.parameters()).dtype
    blocks: list[list[np.ndarray]] = [[] for _ in BLOCK_NODES]
    labels, logits = [], []
    try:
        for images, label in loader:
            out = extractor(images.to(device, dtype))
            for i, name in enumerate(BLOCK_NODES):
                blocks[i].append(out[name].float().mean(dim=(2, 3)).cpu().numpy())
            if "logits" in out:
                logits.append(out["logits"].float().cpu().numpy())
            labels.append(label.numpy())
    finally:
        extractor.train(was_training)
    return BlockFeatures(
        [np.concatenate(b) for b in blocks],
        squeeze_labels(np.concatenate(labels)),
        np.concatenate(logits) if logits else None,
    )


def extract_block_features(
    resnet: nn.Module,
    manifest: Manifest,
    split: str,
    aug: AugConfig,
    image_size: int,
    device: torch.device,
    batch_size: int = 128,
    num_workers: int = 0,
    indices: Sequence[int] | None = None,
    with_logits: bool = False,
) -> BlockFeatures:
    """Pooled layer1..layer4 outputs (and ``fc`` logits) of a torchvision ResNet over ``split`` in eval mode."""
    loader = eval_loader(ShardReader(manifest, split), aug, image_size, batch_size, num_workers, indices)
    return run_blocks(block_extractor(resnet, with_logits).to(device), loader, device)
