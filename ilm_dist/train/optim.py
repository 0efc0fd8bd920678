"""Optimizer and learning-rate schedule (MoCo v2: SGD, cosine decay; Chen et al. 2020)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ilm_dist.config import OptimConfig


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    """Linear scaling rule (Goyal et al. 2017): ``lr`` is for a global batch of 256."""
    return cfg.lr * global_batch / 256 if cfg.scale_lr else cfg.lr


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of the base LR after ``step`` optimizer steps: linear warm-up, then cosine or constant."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, cfg))
