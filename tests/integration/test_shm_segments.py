"""CPU runs neither build DeepSpeed's shared-memory all-reduce op nor leave its segments in /dev/shm."""

import json
import os
from pathlib import Path

import pytest

from tests.launcher import run_deepspeed


def test_the_skip_turns_off_an_op_deepspeed_would_build():
    """In process, no compiling: this machine's DeepSpeed would build the op, and the skip stops it."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from deepspeed.comm.torch import build_shm_op

    from ilm_dist.distributed import _skip_shm_allreduce_op

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not builder.is_compatible():
        pytest.skip("this DeepSpeed would not build the op anyway (no compiler, or not Linux)")
    compatible = deepspeed.ops.__compatible_ops__
    before = compatible[builder.NAME]
    compatible[builder.NAME] = True  # as a fresh process finds it (a group started in this one set it off)
    try:
        _skip_shm_allreduce_op()
        assert build_shm_op() is None
    finally:
        compatible[builder.NAME] = before


@pytest.mark.slow
def test_two_cpu_ranks_start_without_the_op_or_its_segments(tmp_path):
    ranks = 2
    run_deepspeed("tests/dist_scripts/shm_segment.py", [str(tmp_path)], num_procs=ranks, timeout=300)
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(ranks)]
    assert [r["gathered"] for r in records] == [[0, 1]] * ranks  # the group works without the op
    assert [r["shm_op_built"] for r in records] == [False] * ranks
    assert [r["segments_exist"] for r in records] == [[False] * ranks] * ranks
    port = records[0]["port"]
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
