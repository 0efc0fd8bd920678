"""Real 2-rank DeepSpeed pretraining runs on CPU through the launcher."""

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from ilm_dist.cpu_placement import available_cores, plan_placement
from ilm_dist.serialization import load_tensors
from tests.dali_fixtures import image_samples, write_dataset
from tests.launcher import read_metrics, run_deepspeed

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


def pretrain(out, *extra, resume=False, **launch):
    """``launch/pretrain.py`` on configs/demo.yaml + TINY + ``extra``; ``launch``: run_deepspeed's options."""
    args = ["--config", "configs/demo.yaml", f"output_dir={out}", *TINY, *extra]
    return run_deepspeed("launch/pretrain.py", [*args, "--resume"] if resume else args, **launch)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    pretrain(out, "train.max_steps=12", runner=True)  # the README's `deepspeed` command, runner included
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
    # each rank ran with the threads and cores its placement gave it, read back on the rank itself
    plan = plan_placement(2, loader_workers=1, cores=available_cores())  # demo.yaml: 1 loader worker
    cores = [list(plan.cores_of(r)) if plan.bound else list(available_cores()) for r in range(2)]
    assert state["cpu_per_rank"] == [{"threads": plan.threads, "cores": c} for c in cores]
    assert state["cpu_placement"] == plan.describe()
    for name in ("config.yaml", "backbone.pt", "checkpoints/latest"):
        assert (uninterrupted / name).exists(), name
    assert list((uninterrupted / "tensorboard").iterdir())


@pytest.fixture(scope="module")
def crashed(tmp_path_factory):
    """``crashed(fault)``: a 12-step run (checkpoints every 3 steps) SIGKILLed by ``ILM_DIST_FAULT=fault``;
    made once per fault and shared, read-only: a test resumes a copy."""
    runs = {}

    def run(fault: str) -> Path:
        if fault not in runs:
            out = tmp_path_factory.mktemp("crashed")
            proc = pretrain(
                out, "train.max_steps=12", "train.ckpt_every=3", check=False, ILM_DIST_FAULT=fault
            )
            assert proc.returncode != 0, proc.stdout[-3000:]
            runs[fault] = out
        return runs[fault]

    return run


def resumable_copy(crashed_run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(crashed_run, out)
    return out


def assert_same_run(out, reference, first_step):
    got, want = read_metrics(out / "metrics.jsonl"), read_metrics(reference / "metrics.jsonl")
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, 13))  # each step once
    for g, w in zip(got[first_step - 1 :], want[first_step - 1 :], strict=True):
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-4, abs=1e-5), g["step"]
    final, ref = torch.load(out / "backbone.pt"), torch.load(reference / "backbone.pt")
    for key in ref:
        torch.testing.assert_close(final[key], ref[key], rtol=1e-4, atol=1e-5)
    state, ref_state = (json.loads((d / "final_state.json").read_text()) for d in (out, reference))
    assert state["queue_sha256_per_rank"] == ref_state["queue_sha256_per_rank"]


@pytest.mark.parametrize(("fault", "resumed_from"), [("step@8", 6), ("save@6", 3)])
def test_sigkill_then_resume_equals_uninterrupted(uninterrupted, crashed, tmp_path, fault, resumed_from):
    """SIGKILL mid-epoch (step 8) or inside the checkpoint save at step 6 (its folder written, ``latest``
    still naming step 3); the resume follows ``latest`` and is exact: the losses, weights and queues of the
    run that was never interrupted (and never checkpointed)."""
    run = crashed(fault)
    assert (run / "checkpoints" / "latest").read_text() == f"step_{resumed_from}"
    assert not (run / "backbone.pt").exists()
    out = resumable_copy(run, tmp_path)
    proc = pretrain(out, "train.max_steps=12", "train.ckpt_every=3", resume=True)
    assert f"resumed at step {resumed_from}" in proc.stdout + proc.stderr
    assert_same_run(out, uninterrupted, resumed_from + 1)


def test_resume_on_another_world_size(crashed, tmp_path):
    out = resumable_copy(crashed("step@8"), tmp_path)
    proc = pretrain(out, "data.batch_size=16", "train.max_steps=12", resume=True, num_procs=1)
    log = proc.stdout + proc.stderr
    assert (
        "resuming on 1 ranks x batch 16 (checkpoint: 2 x 8): data re-sharded, 96 samples of epoch 0 done"
        in log
    )
    assert "resumed at step 6 (epoch 0, batch 6 of the epoch)" in log
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl")]
    assert steps == list(range(1, 13))  # the crashed run's steps 7-8 are logged once, by the resume
    assert json.loads((out / "final_state.json").read_text())["queue_ptr"] == 12 * 16 % 48


def test_zero_optimizer_state_survives_another_world_size(tmp_path):
    """ZeRO-1 on 2 ranks, resumed on 1 and on 3: every momentum buffer, the step and the LR come back."""
    ds = tmp_path / "zero1.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    run = tmp_path / "run"
    pretrain(run, "train.max_steps=4", f"engine.deepspeed_config={ds}")
    saved = load_tensors(run / "checkpoints/step_4/mp_rank_00_model_states.pt", deepspeed=True)
    full = saved["full_optimizer_state"]["params"]
    assert full and all(set(s) == {"momentum_buffer"} for s in full.values())
    assert sum(s["momentum_buffer"].abs().sum() for s in full.values()) > 0
    for ranks in (1, 3):
        dump = tmp_path / f"restored_{ranks}.pt"
        args = [str(dump), f"output_dir={run}", *TINY, "train.max_steps=8", f"engine.deepspeed_config={ds}"]
        run_deepspeed("tests/dist_scripts/zero_resume.py", args, num_procs=ranks)
        restored = torch.load(dump)
        assert restored["step"] == 4
        # the LR schedule continues from the checkpoint: TINY's constant lr 0.5 for the global batch of 16
        assert restored["lr"] == pytest.approx(saved["lr_scheduler"]["_last_lr"][0]) == 0.5 * 16 / 256
        for name, state in full.items():
            torch.testing.assert_close(restored["state"]["params"][name], state, rtol=0, atol=0)


def test_a_non_finite_loss_on_one_rank_stops_every_rank_with_its_step_and_term(tmp_path):
    """Rank 1 alone sees NaN at step 3: both ranks stop with rank 1's message (not one rank waiting in the next
    collective, which NCCL would hold until its timeout) at the last good checkpoint."""
    proc = pretrain(
        tmp_path, "train.max_steps=12", "train.ckpt_every=1", check=False, ILM_DIST_FAULT="nan@3:1"
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    stops = re.findall(r"rank (\d)/2: (step \d+: non-finite loss term\(s\) \{.*\} on rank \d); stopped", out)
    assert sorted(rank for rank, _ in stops) == ["0", "1"], out[-3000:]
    (message,) = {message for _, message in stops}  # the same on both ranks
    assert message.startswith(
        "step 3: non-finite loss term(s) {'loss': nan, 'moco': nan, "
    ) and message.endswith("} on rank 1"), message
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_2", "the last good checkpoint"


def test_dead_rank_fails_the_job_naming_it(tmp_path):
    proc = pretrain(
        tmp_path,
        "train.max_steps=12",
        "engine.collective_timeout_s=30",
        check=False,
        timeout=240,
        ILM_DIST_FAULT="step@3:1",
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    match = re.search(r"rank 0/2 stopped at step \d+: .*; not heard from since the failure: (.*)", out)
    assert match, out[-3000:]
    assert match.group(1).startswith("rank 1 (last alive at step "), match.group(1)
    assert "rank 0 (" not in match.group(1)


def test_two_ranks_on_packed_shards_with_torch_workers(packed_tiny, tmp_path):
    """The real torch data path under the launcher: DataLoader workers on each rank; paths with spaces and
    non-ASCII letters reach both ranks as one argument each."""
    data = Path(shutil.copytree(packed_tiny, tmp_path / "Daten für Läufe"))
    run = tmp_path / "Läufe mit Leerzeichen"
    pretrain(run, "data.backend=torch", f"data.shards={data}", "data.num_workers=1", "train.max_steps=4")
    assert_four_finite_steps_with_one_queue(run)


def test_two_dali_ranks_share_the_bad_jpeg_scan(tmp_path):
    """DALI in CPU mode under the launcher, with ``data.dali.skip_bad``: the two ranks decode half the split each
    and drop the same undecodable JPEG."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(130)]
    samples = image_samples(images, [(i % 2,) for i in range(130)])
    samples[77] = replace(samples[77], jpg=b"\xff\xd8 not a jpeg")
    shards = write_dataset(tmp_path / "data", samples, ["a", "b"], per_shard=32)
    run = tmp_path / "run"
    args = ["data.backend=dali", f"data.shards={shards}", "data.dali.skip_bad=true", "train.max_steps=4"]
    proc = pretrain(run, *args)
    out = proc.stdout + proc.stderr
    assert "dropping 1 unusable sample(s)" in out and "'s000077': cannot decode JPEG" in out, out[-3000:]
    assert "129 samples" in out and "(1 bad skipped), JPEGs checked by 2 rank(s) in turn" in out, out[-3000:]
    assert_four_finite_steps_with_one_queue(run)


def assert_four_finite_steps_with_one_queue(run: Path) -> None:
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert len(set(json.loads((run / "final_state.json").read_text())["queue_sha256_per_rank"])) == 1


def test_bf16_zero1_channels_last_with_the_bt_op(tmp_path):
    """The GPU recipe's engine settings (bf16, ZeRO-1, NHWC inputs, the csrc op) on CPU ranks."""
    pretrain(
        tmp_path,
        "engine.deepspeed_config=configs/deepspeed/bf16_zero1.json",
        "model.channels_last=true",
        "loss.type=bt",
        "loss.bt.impl=ext",
        "loss.bt.proj_dims=[64, 64]",
        "loss.weights=[5e-5, 5e-5, 5e-5, 5e-5]",
        "train.max_steps=3",
    )
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(
        torch.isfinite(torch.tensor([r["loss"], r["bt_block1"], r["bt_block4"]])).all() for r in records
    )
