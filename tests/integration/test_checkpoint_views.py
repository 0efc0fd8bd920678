"""Checkpoints on 2 ranks through the launcher: rank 0's reading of ``latest`` decides for every rank."""

import pytest
import torch

from ilm_dist.train.run_dir import RunDir
from tests.launcher import run_deepspeed


@pytest.mark.slow
def test_ranks_that_read_latest_differently_save_and_resume_the_same_step(tmp_path):
    """Rank 1's view of ``latest`` is stale at the save and at the resume (tests/dist_scripts/checkpoint_views.py):
    rank 0's reading decides for both, so both write step 2 and both resume its weights."""
    run_deepspeed("tests/dist_scripts/checkpoint_views.py", [str(tmp_path)], timeout=240)
    result = torch.load(tmp_path / "result.pt")
    assert (tmp_path / "checkpoints" / RunDir.LATEST).read_text() == "step_2"
    for weights in result["resumed_per_rank"]:
        for got, saved in zip(weights, result["saved"], strict=True):
            torch.testing.assert_close(got, saved, rtol=0, atol=0)
