"""Does a CPU run leave DeepSpeed's shared-memory all-reduce segments in /dev/shm?

    deepspeed --num_gpus R tests/dist_scripts/shm_segment.py OUT_DIR {deepspeed,ilm_dist}

``deepspeed`` joins the process group with plain ``deepspeed.init_distributed`` (the control: the
segments exist), ``ilm_dist`` with :func:`ilm_dist.train.engine.init_distributed`. Each rank writes
OUT_DIR/rank<r>.json with which segments exist after init; the control then unlinks its own.
"""

import argparse
import json
import os
from pathlib import Path

from ilm_dist import distributed as D
from ilm_dist.config import load_config
from ilm_dist.train import engine


def main(out_dir: Path, init: str) -> None:
    if init == "deepspeed":
        engine.select_accelerator()
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    else:
        engine.init_distributed(load_config("configs/demo.yaml"))
    from deepspeed.comm import comm

    D.barrier()  # every rank is past init before anyone looks
    segments = [engine.shm_allreduce_segment(r) for r in range(D.world_size())]
    record = {
        "port": os.environ["MASTER_PORT"],
        "shm_op_built": comm.cdb.shm_comm_op is not None,
        "segments_exist": [s.exists() for s in segments],
    }
    D.barrier()
    if init == "deepspeed":
        engine.shm_allreduce_segment(D.rank()).unlink(missing_ok=True)
    (out_dir / f"rank{D.rank()}.json").write_text(json.dumps(record))
    D.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("init", choices=["deepspeed", "ilm_dist"])
    parser.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    args = parser.parse_args()
    main(args.out_dir, args.init)
