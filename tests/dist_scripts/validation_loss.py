"""The validation loss of a fixed model on R ranks, for the R-vs-1 comparison.

    deepspeed --num_gpus R tests/dist_scripts/validation_loss.py OUT_FILE SHARDS key=value ...

Builds the MoCo module, key encoder and queue from configs/demo.yaml with the overrides and a fixed seed,
moves their BatchNorm running statistics away from their initial values with a few seeded train-mode
forwards (the same on every rank), then rank 0 writes what :class:`ValidationLoss` returns as JSON.
"""

import json
import sys
from pathlib import Path

import torch

from ilm_dist import distributed as D
from ilm_dist.config import load_config
from ilm_dist.data.batch import Placement
from ilm_dist.data.manifest import load_manifest
from ilm_dist.moco.key_encoder import KeyEncoder
from ilm_dist.moco.queue import KeyQueue
from ilm_dist.model.moco import MoCoILM
from ilm_dist.train.validation import Models, ValidationLoss


def fixed_models(cfg, device: torch.device) -> Models:
    torch.manual_seed(0)
    query = MoCoILM(cfg.model, cfg.moco, cfg.loss).to(device)
    key = KeyEncoder(query.encoder)
    with torch.no_grad():
        for _ in range(3):  # BN running statistics that differ from the initial 0 / 1
            images = 2 * torch.rand(8, 3, cfg.data.image_size, cfg.data.image_size, device=device)
            query.encoder(images)
            key(images + 0.5)
    return Models(query, key, KeyQueue(cfg.moco.queue_size, cfg.moco.dim, device).keys)


if __name__ == "__main__":
    out, shards, *overrides = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    cfg = load_config("configs/demo.yaml", [f"data.shards={shards}", *overrides])
    _, device = D.init_process_group("gloo")
    where = Placement(D.rank(), D.world_size(), device, cfg.seed, cfg.model.channels_last)
    validator = ValidationLoss(cfg.val, cfg.data, cfg.aug, where, load_manifest(cfg.data.shards))
    results = validator(fixed_models(cfg, device), step=1)
    if D.rank() == 0:
        Path(out).write_text(json.dumps(results))
    D.shutdown()
