"""Real 2-rank DeepSpeed pretraining runs on CPU through the launcher."""

import json

import pytest
import torch

from ilm_dist.train.metrics import read_metrics
from tests.launcher import run_deepspeed

pytestmark = pytest.mark.slow

TINY = [
    "data.backend=synthetic",
    "data.image_size=32",
    "data.batch_size=8",
    "data.synthetic.num_samples=512",
    "moco.queue_size=48",
    "optim.schedule=constant",
    "optim.warmup_steps=0",
    "optim.lr=0.5",
    "train.log_every=1",
]


def pretrain(out, *extra, resume=False):
    args = ["--config", "configs/demo.yaml", f"output_dir={out}", *TINY, *extra]
    return run_deepspeed("launch/pretrain.py", [*args, "--resume"] if resume else args)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    pretrain(out, "train.max_steps=12")
    return out


def test_two_ranks_train_with_identical_queues(uninterrupted):
    records = read_metrics(uninterrupted / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 13))
    losses = [r["loss"] for r in records]
    assert all(torch.isfinite(torch.tensor(losses)))
    # the queue (48) holds only real keys from step 3 on; from there the loss must go down
    assert sum(losses[-3:]) / 3 < sum(losses[3:6]) / 3
    state = json.loads((uninterrupted / "final_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 12
    assert state["queue_ptr"] == 12 * 16 % 48
    assert len(set(state["queue_sha256_per_rank"])) == 1
    for name in ("config.yaml", "backbone.pt", "checkpoints/latest"):
        assert (uninterrupted / name).exists(), name
    assert list((uninterrupted / "tensorboard").iterdir())


def test_resume_continues_from_the_saved_step(uninterrupted, tmp_path):
    pretrain(tmp_path, "train.max_steps=12", "train.ckpt_every=6", "train.epochs=1")
    first = read_metrics(tmp_path / "metrics.jsonl")
    # simulate the loss of the tail: keep the checkpoint at step 6 only, metrics up to step 6
    (tmp_path / "checkpoints" / "latest").write_text("step_6")
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in first[:6]))
    proc = pretrain(tmp_path, "train.max_steps=12", "train.ckpt_every=6", resume=True)
    assert "resumed at step 6" in proc.stdout + proc.stderr
    resumed = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, 13))
    reference = read_metrics(uninterrupted / "metrics.jsonl")
    for got, want in zip(resumed[6:], reference[6:], strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-4, abs=1e-5), got["step"]
    final = torch.load(tmp_path / "backbone.pt")
    ref = torch.load(uninterrupted / "backbone.pt")
    for key in ref:
        torch.testing.assert_close(final[key], ref[key], rtol=1e-4, atol=1e-5)
