"""shuffled_forward on real gloo ranks through the DeepSpeed launcher: same bits as all_gather."""

import json

import pytest

from tests.launcher import run_deepspeed

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("ranks", [2, 3])
def test_all_to_all_shuffle_matches_the_all_gather_one(tmp_path, ranks):
    run_deepspeed("tests/dist_scripts/shuffle_bn.py", [str(tmp_path)], num_procs=ranks, timeout=300)
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(ranks)]
    assert [r["rank"] for r in records] == list(range(ranks))
    for rec in records:
        assert len(rec["steps"]) == 6 and len(rec["checked"]) == 4
    for step in range(6):
        # what rank s sends to rank d is what d expects from s
        sends = [rec["steps"][step]["send_splits"] for rec in records]
        recvs = [rec["steps"][step]["recv_splits"] for rec in records]
        assert all(recvs[d][s] == sends[s][d] for s in range(ranks) for d in range(ranks))
