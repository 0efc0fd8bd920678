"""A few real training steps per variant, dumping what MoCo defines globally, for R-vs-1 comparisons.

    deepspeed --num_gpus R tests/dist_scripts/equivalence.py OUT_DIR SHARDS BATCH_PER_RANK

BatchNorm runs from its running statistics (eval mode), so every sample's features are independent
of how the batch is split across ranks; what remains is exactly what the method shares between
ranks: the global batches, the shuffled keys, the queue, the averaged gradients and, with
``loss.bt.global_batch``, the Barlow Twins statistics.
"""

import argparse
import json
from pathlib import Path

import torch

from ilm_dist import distributed as D
from ilm_dist.config import load_config
from ilm_dist.train.trainer import Trainer

VARIANTS = {
    "mse": ["loss.type=mse"],
    "bt_global": ["loss.type=bt", "loss.bt.global_batch=true"],
    "bt_local": ["loss.type=bt", "loss.bt.global_batch=false"],
}
STEPS = 3


def run(name: str, out: Path, shards: str, batch: int) -> None:
    cfg = load_config(
        "configs/demo.yaml",
        [
            *VARIANTS[name],
            f"data.shards={shards}",
            f"data.batch_size={batch}",
            "data.image_size=32",
            "data.num_workers=0",
            "moco.queue_size=40",
            "loss.bt.proj_dims=[32, 32]",
            "loss.mse.pool_sizes=[4, 2, 2, 1]",
            "optim.schedule=constant",
            "optim.warmup_steps=0",
            "optim.lr=0.2",
            f"output_dir={out / name}",
            "train.deterministic=true",
            # fp32 and NCHW on every machine: the demo's bf16 autocast (AMX CPUs) rounds a batch of 2B
            # and two of B apart, which is not what this compares
            "engine.cpu_autocast=none",
            "model.channels_last=false",
        ],
    )
    trainer = Trainer(cfg)
    # BatchNorm on its running statistics, so a batch of 2B and two of B normalise alike; the losses stay in
    # training mode (in eval mode, as in the validation loss, Barlow Twins statistics are per batch).
    for module in [*trainer.engine.module.modules(), *trainer.key_encoder.modules()]:
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()
    losses = []
    for _, batch_data in zip(range(STEPS), trainer.loader.epoch(0), strict=False):
        terms = trainer.train_step(batch_data)
        losses.append(D.all_reduce_mean_(torch.stack([t.detach().float() for t in terms.values()])).tolist())
    if D.rank() == 0:
        torch.save(
            {
                "queue": trainer.queue.keys.cpu(),
                "ptr": trainer.queue.ptr,
                "params": {
                    k: v.detach().float().cpu() for k, v in trainer.engine.module.state_dict().items()
                },
            },
            out / f"{name}.pt",
        )
        (out / f"{name}.json").write_text(json.dumps({"terms": list(terms), "losses": losses}))
    D.barrier()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("shards")
    parser.add_argument("batch_per_rank", type=int)
    parser.add_argument("--local_rank", type=int)  # added by the deepspeed launcher
    args = parser.parse_args()
    for variant in VARIANTS:
        run(variant, args.out, args.shards, args.batch_per_rank)
