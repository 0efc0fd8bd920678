"""CPU runs must not leave DeepSpeed's shared-memory all-reduce segments behind in /dev/shm."""

import json
from pathlib import Path

import pytest

from tests.launcher import run_deepspeed

pytestmark = pytest.mark.slow


def run(tmp_path, init: str, ranks: int = 2) -> list[dict]:
    run_deepspeed("tests/dist_scripts/shm_segment.py", [str(tmp_path), init], num_procs=ranks, timeout=300)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(ranks)]


def leftovers(port: str, ranks: int) -> list[str]:
    names = [f"deepspeed_allreduce_buffer_*_{port}_{r}" for r in range(ranks)]
    return [str(p) for name in names for p in Path("/dev/shm").glob(name)]


def test_plain_deepspeed_init_leaves_one_segment_per_rank(tmp_path):
    """The control: without ilm_dist's cleanup DeepSpeed's segments outlive init (so the next test can fail)."""
    records = run(tmp_path, "deepspeed")
    assert all(r["shm_op_built"] for r in records)
    assert [r["segments_exist"] for r in records] == [[True, True]] * 2
    assert leftovers(records[0]["port"], 2) == []  # the script unlinked them itself


def test_ilm_dist_init_unlinks_the_segments_before_training(tmp_path):
    records = run(tmp_path, "ilm_dist")
    assert all(r["shm_op_built"] for r in records)
    assert [r["segments_exist"] for r in records] == [[False, False]] * 2
    assert leftovers(records[0]["port"], 2) == []
