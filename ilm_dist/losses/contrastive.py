"""InfoNCE over one positive key and the queue's negatives (He et al. 2020, Eq. 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def moco_logits(q: Tensor, k: Tensor, queue: Tensor, temperature: float) -> Tensor:
    """``[B, 1 + K]`` logits in fp32: column 0 is q.k, the rest q.queue; inputs L2-normalised."""
    q, k = q.float(), k.float()
    positive = (q * k).sum(dim=1, keepdim=True)
    negative = q @ queue.float().T
    return torch.cat([positive, negative], dim=1) / temperature


def info_nce(logits: Tensor) -> Tensor:
    """Cross-entropy with the positive at index 0."""
    return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device))


def top1_accuracy(logits: Tensor) -> Tensor:
    """How often the positive key outranks every negative (a training-health signal)."""
    return (logits.argmax(dim=1) == 0).float().mean()
