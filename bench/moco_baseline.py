"""MoCo v2 + an intermediate-layer loss trained "the usual way": the baseline of bench/pretrain_throughput.py.

Implemented as the official code (aakashrkaku/intermdiate_layer_matter_ssl), facebookresearch/moco and
solo-learn do it without DALI: a plain map-style Dataset over the packed shards (PIL decode, torchvision v2
MoCo v2 views) in a DataLoader with one worker per core; a torchvision ResNet run block by block; fp32
weights under ``torch.autocast`` (fp16 with a GradScaler on CUDA, bf16 on CPU); the per-layer Barlow Twins
loss of the official code (``bench/xcorr.py:official_loss``: per-block projector, BatchNorm1d(affine=False),
D x D matmul, diagonal / off-diagonal) or the pooled MSE; a per-parameter Python loop for the momentum
update; the official queue (its pointer read back with ``int()``); plain ``torch.optim.SGD``; one
process, no DDP. It trains from the same RunConfig as ilm_dist's Trainer and can start from a Trainer's
state (:meth:`Baseline.load_from`), which the loss-curve parity check (bench/loss_parity.py) uses.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode
from torchvision.transforms import v2
from xcorr import official_loss

from ilm_dist.config import AugConfig, RunConfig
from ilm_dist.data.augment import blur_kernel_size
from ilm_dist.data.manifest import load_manifest
from ilm_dist.data.shard_reader import ShardReader
from ilm_dist.losses.barlow_twins import bt_projector
from ilm_dist.model.encoder import block_channels, build_resnet, projection_head
from ilm_dist.train.optim import scaled_lr
from ilm_dist.train.timing import StepTimer
from ilm_dist.train.trainer import Trainer


def torchvision_view_transform(aug: AugConfig, image_size: int) -> v2.Compose:
    """One MoCo v2 view the usual way: torchvision v2 transforms on one PIL image (uint8 until the end)."""
    if aug.crop_scale is None:
        geometry = [v2.Resize((image_size, image_size), antialias=True)]
    else:
        geometry = [v2.RandomResizedCrop(image_size, scale=tuple(aug.crop_scale), antialias=True)]
    blur = v2.GaussianBlur(blur_kernel_size(image_size), sigma=tuple(aug.blur_sigma))
    ops = [
        v2.PILToTensor(),
        *geometry,
        v2.RandomApply([v2.ColorJitter(*aug.color_jitter)], p=aug.color_jitter_p),
        v2.RandomGrayscale(p=aug.grayscale_p),
        v2.RandomApply([blur], p=aug.blur_p),
        *([v2.RandomRotation(aug.rotation)] if aug.rotation > 0 else []),
        *([v2.RandomHorizontalFlip()] if aug.hflip else []),
        *([v2.RandomVerticalFlip()] if aug.vflip else []),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(aug.mean, aug.std),
    ]
    return v2.Compose(ops)


class ViewPairs(Dataset):
    """A plain map-style dataset over the packed shards: PIL decode, two torchvision MoCo v2 views."""

    def __init__(self, cfg: RunConfig):
        self.reader = ShardReader(load_manifest(cfg.data.shards), cfg.data.split)
        self.transform = torchvision_view_transform(cfg.aug, cfg.data.image_size)

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = self.reader.image(index)
        return self.transform(image), self.transform(image)


def baseline_batches(cfg: RunConfig, device: torch.device) -> Iterator[list[Tensor]]:
    """Endless shuffled batches from a DataLoader with one worker per core (as the official code)."""
    loader = DataLoader(
        ViewPairs(cfg),
        batch_size=cfg.data.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=os.cpu_count() or 1,
        pin_memory=device.type == "cuda",
        persistent_workers=True,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    while True:
        yield from loader


class BaselineEncoder(nn.Module):
    """A torchvision ResNet run block by block (returning the block outputs) and the MoCo head."""

    def __init__(self, cfg: RunConfig):
        super().__init__()
        self.backbone = build_resnet(cfg.model.arch, cfg.model.zero_init_residual, cfg.model.stem)
        self.head = projection_head(self.backbone.fc.in_features, cfg.moco.dim, cfg.moco.mlp)
        self.backbone.fc = nn.Identity()

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        r = self.backbone
        x = r.maxpool(r.relu(r.bn1(r.conv1(x))))
        blocks = []
        for layer in (r.layer1, r.layer2, r.layer3, r.layer4):
            x = layer(x)
            blocks.append(x)
        return self.head(torch.flatten(r.avgpool(x), 1)), blocks


class Baseline:
    """MoCo v2 + an intermediate-layer loss trained the usual way (see the module docstring)."""

    def __init__(
        self, cfg: RunConfig, device: torch.device, dtype: torch.dtype, timer: StepTimer | None = None
    ):
        self.cfg, self.device, self.dtype = cfg, device, dtype
        self.loss, self.blocks = cfg.loss, cfg.loss.blocks
        self.model = nn.ModuleDict({"encoder": BaselineEncoder(cfg)})
        if self.loss.type == "bt":
            channels = block_channels(self.model.encoder.backbone)
            dims = self.loss.bt.proj_dims
            self.model["projectors"] = nn.ModuleList(bt_projector(channels[b - 1], dims) for b in self.blocks)
        self.model.to(device)
        self.key_encoder = copy.deepcopy(self.model.encoder).requires_grad_(False)
        self.queue = F.normalize(torch.randn(cfg.moco.dim, cfg.moco.queue_size, device=device), dim=0)
        self.queue_ptr = torch.zeros(1, dtype=torch.long, device=device)
        self.weights = torch.tensor(self.loss.weights, device=device)
        lr = scaled_lr(cfg.optim, cfg.data.batch_size)
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        self.timer = timer or StepTimer()

    def autocast(self) -> AbstractContextManager[None]:
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def load_from(self, trainer: Trainer) -> None:
        """Start from ilm_dist's state: the engine's weights, its key encoder and its queue."""
        state = trainer.engine.module.state_dict()
        self.model.load_state_dict({k.replace("intermediate.", "", 1): v for k, v in state.items()})
        self.key_encoder.load_state_dict(trainer.key_encoder.encoder.state_dict())
        self.queue.copy_(trainer.queue.keys.T)

    @torch.no_grad()
    def momentum_update(self) -> None:
        m = self.cfg.moco.momentum
        for param_q, param_k in zip(
            self.model.encoder.parameters(), self.key_encoder.parameters(), strict=True
        ):
            param_k.data = param_k.data * m + param_q.data * (1.0 - m)

    def reduce(self, blocks: list[Tensor]) -> list[Tensor]:
        if self.loss.type == "bt":
            return [F.adaptive_avg_pool2d(blocks[b - 1], 1).flatten(1) for b in self.blocks]
        sizes = self.loss.mse.pool_sizes
        return [F.adaptive_avg_pool2d(blocks[b - 1], sizes[b - 1]) for b in self.blocks]

    @torch.no_grad()
    def keys(self, view2: Tensor) -> list[Tensor]:
        with self.autocast():
            embedding, blocks = self.key_encoder(view2)
            return [F.normalize(embedding, dim=1), *self.reduce(blocks)]

    def terms(self, view1: Tensor, keys: list[Tensor]) -> dict[str, Tensor]:
        with self.timer.phase("forward"), self.autocast():
            embedding, blocks = self.model.encoder(view1)
        with self.timer.phase("loss"), self.autocast():
            q = F.normalize(embedding, dim=1)
            l_pos = torch.einsum("nc,nc->n", q, keys[0]).unsqueeze(-1)
            l_neg = torch.einsum("nc,ck->nk", q, self.queue.clone().detach())
            logits = torch.cat([l_pos, l_neg], dim=1) / self.cfg.moco.temperature
            moco = F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=self.device))
            per_block = self.intermediate(self.reduce(blocks), keys[1:])
        names = [f"{self.loss.type}_block{b}" for b in self.blocks]
        return {"loss": moco + per_block.sum(), "moco": moco, **dict(zip(names, per_block, strict=True))}

    def intermediate(self, q_reduced: list[Tensor], k_reduced: list[Tensor]) -> Tensor:
        if self.loss.type == "mse":
            losses = [F.mse_loss(q, k) for q, k in zip(q_reduced, k_reduced, strict=True)]
            return self.weights * torch.stack(losses)
        projectors, bt = self.model.projectors, self.loss.bt
        z1 = torch.stack([proj(q) for proj, q in zip(projectors, q_reduced, strict=True)])
        z2 = torch.stack([proj(k) for proj, k in zip(projectors, k_reduced, strict=True)])
        on_weight = self.weights * bt.scale
        return official_loss(z1, z2, on_weight, on_weight * bt.off_diag_weight)

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        ptr = int(self.queue_ptr)  # the official code's host read of the pointer (a sync on CUDA)
        assert self.queue.shape[1] % len(keys) == 0, "the official queue needs K % batch == 0"
        self.queue[:, ptr : ptr + len(keys)] = keys.T
        self.queue_ptr[0] = (ptr + len(keys)) % self.queue.shape[1]

    def step(self, batch: list[Tensor]) -> dict[str, Tensor]:
        phase = self.timer.phase
        with phase("to_device"):
            view1, view2 = (v.to(self.device, non_blocking=True) for v in batch)
        with phase("ema"):
            self.momentum_update()
        with phase("key_forward"):
            keys = self.keys(view2)
        terms = self.terms(view1, keys)
        with phase("backward"):
            self.optimizer.zero_grad()
            self.scaler.scale(terms["loss"]).backward()
        with phase("optimizer"):
            self.scaler.step(self.optimizer)
            self.scaler.update()
        with phase("queue"):
            self.enqueue(keys[0])
        return terms

    def model_flops(self, batch: list[Tensor]) -> int:
        """FLOPs of one query forward + backward, key forward and loss (no optimizer step)."""
        view1, view2 = (v.to(self.device) for v in batch)
        with FlopCounterMode(display=False) as counter:
            self.terms(view1, self.keys(view2))["loss"].backward()
        self.optimizer.zero_grad()
        return counter.get_total_flops()


def baseline_dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def baseline_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32:
        return "fp32, no autocast"
    scaler = " + GradScaler" if dtype == torch.float16 else ""
    return f"fp32 weights, torch.autocast {str(dtype).removeprefix('torch.')}{scaler}"
