"""Does a CPU run leave DeepSpeed's shared-memory all-reduce segments in /dev/shm?

    deepspeed --num_gpus R tests/dist_scripts/shm_segment.py OUT_DIR {deepspeed,ilm_dist}

``deepspeed`` joins the process group with plain ``deepspeed.init_distributed`` (the control: the
segments exist), ``ilm_dist`` with :func:`ilm_dist.distributed.init_process_group`. Each rank writes
OUT_DIR/rank<r>.json with which segments exist after init; the control then unlinks its own.
"""

import argparse
import json
import os
from pathlib import Path

from ilm_dist import distributed as D


def main(out_dir: Path, init: str) -> None:
    if init == "deepspeed":
        D.select_accelerator()
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    else:
        D.init_process_group()
    from deepspeed.comm import comm

    D.barrier()  # every rank is past init before anyone looks
    segments = [D.shm_allreduce_segment(r) for r in range(D.world_size())]
    record = {
        "port": os.environ["MASTER_PORT"],
        "shm_op_built": comm.cdb.shm_comm_op is not None,
        "segments_exist": [s.exists() for s in segments],
    }
    D.barrier()
    if init == "deepspeed":
        D.shm_allreduce_segment(D.rank()).unlink(missing_ok=True)
    (out_dir / f"rank{D.rank()}.json").write_text(json.dumps(record))
    D.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("init", choices=["deepspeed", "ilm_dist"])
    parser.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    args = parser.parse_args()
    main(args.out_dir, args.init)
