"""Components the trainer runs every few steps on the models it trains, without knowing what they measure.

The trainer is handed *builders* (``device -> Validator``), builds them once it knows its device, and
every ``validator.every`` optimizer steps logs what ``validator(models, step)`` returns. A validator with
``main_rank_only`` runs on rank 0 alone and must not use collectives (the other ranks wait at the next
one). The online kNN monitor (:class:`ilm_dist.eval.monitor.KnnMonitor`) is one; the trainer imports none.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn


@dataclass(frozen=True)
class Models:
    """What a validator may look at (read-only): the trainable MoCo module, the key encoder, the queue."""

    query: nn.Module  # ilm_dist.model.moco.MoCoILM: .encoder.backbone is the torchvision ResNet's body
    key_encoder: nn.Module
    queue: torch.Tensor


class Validator(Protocol):
    every: int  # optimizer steps between calls
    main_rank_only: bool

    def __call__(self, models: Models, step: int) -> dict[str, float]: ...


ValidatorBuilder = Callable[[torch.device], Validator]
