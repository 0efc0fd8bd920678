"""Ranks that see ``latest`` differently (a network file system caching attributes) still save and resume together.

    deepspeed --num_gpus 2 tests/dist_scripts/checkpoint_views.py OUT_DIR

A tiny DeepSpeed engine saves ``step_1``, takes an optimizer step and saves ``step_2``, while rank 1's view of
``latest`` is stale (it already names the tag being saved, so a rank deciding alone would skip the save and
leave the other in its collectives); then a fresh engine resumes while rank 1's view still names ``step_1``.
Rank 0 writes OUT_DIR/result.pt: each rank's weights after the resume, and the weights that were saved as
``step_2``. A rank that skipped the save or disagreed would show as a collective timeout (exit != 0).
"""

import sys
from pathlib import Path

import torch

from ilm_dist import distributed as D
from ilm_dist.train import checkpoint
from ilm_dist.train import engine as ds_engine
from ilm_dist.train.run_dir import RunDir

STALE = {"save": "step_2", "restore": "step_1"}  # what rank 1's reading of `latest` says, per phase


def tiny_engine():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    config = ds_engine.resolve_deepspeed_config(None, micro_batch=2)
    return ds_engine.wrap(model, optimizer, None, config)


def stale_view_on_rank_1(phase: str) -> None:
    if D.rank() == 1:
        RunDir.latest_tag = lambda run: STALE[phase]


def main(out: Path) -> None:
    D.init_process_group("gloo", timeout_s=30)
    engine = tiny_engine()
    checkpoint.save(engine, RunDir(out), 1, {"moco": {}}, keep=3)
    loss = engine(torch.full((2, 4), float(D.rank() + 1))).square().sum()
    engine.backward(loss)
    engine.step()
    saved = [p.detach().clone() for p in engine.module.parameters()]
    stale_view_on_rank_1("save")
    checkpoint.save(engine, RunDir(out), 2, {"moco": {}}, keep=3)
    stale_view_on_rank_1("restore")
    resumed = tiny_engine()
    checkpoint.restore(resumed, RunDir(out), D.world_size())
    weights = D.all_gather_object([p.detach().clone() for p in resumed.module.parameters()])
    if D.rank() == 0:
        torch.save({"saved": saved, "resumed_per_rank": weights}, out / "result.pt")
    D.shutdown()


if __name__ == "__main__":
    main(Path(next(a for a in sys.argv[1:] if not a.startswith("--local_rank"))))
