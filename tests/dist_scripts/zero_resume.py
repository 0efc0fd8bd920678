"""Resume a ZeRO run through the trainer and dump the restored optimizer state (for the world-size test).

    deepspeed --num_gpus R tests/dist_scripts/zero_resume.py OUT_FILE key=value ...

Builds ``Trainer(cfg, resume=True)`` from configs/demo.yaml with the overrides, then rank 0 writes
OUT_FILE with every parameter's full optimizer state, the step and the learning rate.
"""

import sys

import torch

from ilm_dist import distributed as D
from ilm_dist.config import load_config
from ilm_dist.train.trainer import Trainer
from ilm_dist.train.zero_state import gather_full_optimizer_state

if __name__ == "__main__":
    out, *overrides = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    trainer = Trainer(load_config("configs/demo.yaml", overrides), resume=True)
    state = gather_full_optimizer_state(trainer.engine)
    if D.rank() == 0:
        torch.save({"state": state, "step": trainer.global_step, "lr": trainer.engine.get_lr()[0]}, out)
    D.shutdown()
