"""MoCo v2 with intermediate-layer losses: the trainable module (no distribution code here).

The data-parallel engine wraps :class:`MoCoILM`; the key encoder, the queue and the shuffling of
keys across ranks live in the training step, which hands the keys in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ilm_dist.config import LossConfig, MocoConfig, ModelConfig
from ilm_dist.losses.contrastive import info_nce, moco_logits, top1_accuracy
from ilm_dist.losses.intermediate import build_intermediate_loss
from ilm_dist.losses.precision import autocast_off
from ilm_dist.model.encoder import Encoder


class MoCoILM(nn.Module):
    def __init__(self, model: ModelConfig, moco: MocoConfig, loss: LossConfig):
        super().__init__()
        self.encoder = Encoder(model.arch, moco.dim, moco.mlp, model.zero_init_residual, model.stem)
        self.intermediate = build_intermediate_loss(loss, self.encoder.channels)
        self.temperature = moco.temperature

    def term_names(self) -> list[str]:
        """Names of the logged loss terms, in order."""
        inter = self.intermediate.term_names() if self.intermediate is not None else []
        return ["loss", "moco", *inter, "moco_acc"]

    @torch.no_grad()
    def key_features(self, key_encoder: nn.Module, images: Tensor) -> list[Tensor]:
        """What the loss needs from the key encoder, per sample: the normalised key and reduced blocks."""
        out = key_encoder(images)
        blocks = self.intermediate.reduce(out.blocks) if self.intermediate is not None else []
        return [F.normalize(out.embedding.float(), dim=1), *blocks]

    def forward(self, view_q: Tensor, keys: list[Tensor], queue: Tensor) -> dict[str, Tensor]:
        """Loss terms for a query view given the key features of the other view and the queue."""
        out = self.encoder(view_q)
        q = F.normalize(out.embedding.float(), dim=1)
        with autocast_off(q):
            logits = moco_logits(q, keys[0], queue, self.temperature)
            terms = {"moco": info_nce(logits)}
        total = terms["moco"]
        if self.intermediate is not None:
            per_block = self.intermediate(self.intermediate.reduce(out.blocks), keys[1:])
            terms |= dict(zip(self.intermediate.term_names(), per_block, strict=True))
            total = total + per_block.sum()
        return {"loss": total, **terms, "moco_acc": top1_accuracy(logits.detach())}
