"""Does a CPU run started by ilm_dist build DeepSpeed's shared-memory all-reduce op or map its segments?

    deepspeed --num_gpus R tests/dist_scripts/shm_segment.py OUT_DIR

Each rank joins the group with :func:`ilm_dist.distributed.init_process_group`, all-gathers its rank and
writes OUT_DIR/rank<r>.json: whether the op was built, which of the segments DeepSpeed's ``shm.cpp``
names ``deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>`` exist, and the gathered ranks.
"""

import argparse
import json
import os
from pathlib import Path

import torch

from ilm_dist import distributed as D


def segment(rank: int) -> Path:
    port, addr = os.environ["MASTER_PORT"], os.environ["MASTER_ADDR"]
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def main(out_dir: Path) -> None:
    D.init_process_group()
    from deepspeed.comm import comm

    gathered = D.all_gather_no_grad(torch.tensor([D.rank()]))
    D.barrier()  # every rank is past init before anyone looks
    record = {
        "port": os.environ["MASTER_PORT"],
        "shm_op_built": comm.cdb.shm_comm_op is not None,
        "segments_exist": [segment(r).exists() for r in range(D.world_size())],
        "gathered": gathered.tolist(),
    }
    (out_dir / f"rank{D.rank()}.json").write_text(json.dumps(record))
    D.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    main(parser.parse_args().out_dir)
