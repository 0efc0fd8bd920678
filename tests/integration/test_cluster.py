"""Scale equivalence and multi-node launch, through the real launcher on CPU (gloo).

- R=2 ranks x batch B equals 1 rank x batch 2B in what MoCo defines globally: the global batches,
  shuffled keys, queue contents and pointer, averaged gradients (hence weights) and, with
  ``loss.bt.global_batch``, the Barlow Twins statistics; without that option the BT terms differ.
- 2 nodes x 2 processes started by the no-ssh recipe equal 1 node x 4 processes.
- the dry run plans a 4-node x 8-GPU ResNet-50 job.
"""

import json
import re
import subprocess
import sys
import time

import pytest
import torch

from ilm_dist.config import load_config
from ilm_dist.model.moco import MoCoILM
from ilm_dist.plan import build_plan
from ilm_dist.train.engine import DTYPES, precision_of, resolve_deepspeed_config
from tests.launcher import REPO, cpu_env, free_port, read_metrics, run_deepspeed

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def equivalence_runs(packed_tiny, tmp_path_factory):
    two, one = tmp_path_factory.mktemp("r2"), tmp_path_factory.mktemp("r1")
    run_deepspeed("tests/dist_scripts/equivalence.py", [str(two), str(packed_tiny), "8"], num_procs=2)
    run_deepspeed("tests/dist_scripts/equivalence.py", [str(one), str(packed_tiny), "16"], num_procs=1)
    return two, one


def load(run, variant):
    return json.loads((run / f"{variant}.json").read_text()), torch.load(run / f"{variant}.pt")


@pytest.mark.parametrize("variant", ["mse", "bt_global"])
def test_two_ranks_equal_one_rank_with_the_global_batch(equivalence_runs, variant):
    (m2, s2), (m1, s1) = (load(run, variant) for run in equivalence_runs)
    torch.testing.assert_close(torch.tensor(m2["losses"]), torch.tensor(m1["losses"]), rtol=1e-4, atol=1e-6)
    assert s2["ptr"] == s1["ptr"] == 3 * 16 % 40
    torch.testing.assert_close(s2["queue"], s1["queue"], rtol=1e-4, atol=1e-5)
    for key, value in s1["params"].items():
        torch.testing.assert_close(s2["params"][key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_per_rank_barlow_twins_statistics_differ(equivalence_runs):
    """The control: without the global-batch option the BT terms are per-rank, so R=2 != R=1."""
    (m2, _), (m1, _) = (load(run, "bt_local") for run in equivalence_runs)
    bt = [i for i, name in enumerate(m1["terms"]) if name.startswith("bt_block")]
    first2, first1 = torch.tensor(m2["losses"][0]), torch.tensor(m1["losses"][0])
    assert not torch.allclose(first2[bt], first1[bt], rtol=1e-3)
    moco = m1["terms"].index("moco")
    assert first2[moco] == pytest.approx(first1[moco].item(), rel=1e-4)  # InfoNCE is still the same


TINY = [
    "--config",
    "configs/demo.yaml",
    "data.backend=synthetic",
    "data.image_size=32",
    "data.batch_size=4",
    "data.synthetic.num_samples=256",
    "moco.queue_size=48",
    "optim.schedule=constant",
    "optim.lr=0.2",
    "train.log_every=1",
    "train.max_steps=5",
]


def test_two_nodes_equal_one_node(tmp_path):
    nodes, single = tmp_path / "2x2", tmp_path / "1x4"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=2\nnode1 slots=2\n")
    port = str(free_port())
    launches = [
        subprocess.Popen(
            [
                "bash",
                "launch/cluster/node.sh",
                str(hostfile),
                str(rank),
                "127.0.0.1",
                *TINY,
                f"output_dir={nodes}",
            ],
            cwd=REPO,
            env=cpu_env(MASTER_PORT=port),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    deadline = time.time() + 600
    outputs = [p.communicate(timeout=max(1, deadline - time.time()))[0] for p in launches]
    assert [p.returncode for p in launches] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    run_deepspeed("launch/pretrain.py", [*TINY, f"output_dir={single}"], num_procs=4, runner=True)
    a, b = (json.loads((d / "final_state.json").read_text()) for d in (nodes, single))
    assert a["world_size"] == b["world_size"] == 4
    assert a["queue_sha256_per_rank"] == b["queue_sha256_per_rank"]
    assert [r["loss"] for r in read_metrics(nodes / "metrics.jsonl")] == pytest.approx(
        [r["loss"] for r in read_metrics(single / "metrics.jsonl")], rel=1e-6
    )
    wa, wb = torch.load(nodes / "backbone.pt"), torch.load(single / "backbone.pt")
    for key in wb:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-6, atol=1e-7)


def test_dry_run_plans_a_32_gpu_job():
    start = time.time()
    proc = subprocess.run(
        [
            sys.executable,
            "launch/dry_run.py",
            "--config",
            "configs/nih/moco_bt.yaml",
            "--nodes",
            "4",
            "--gpus-per-node",
            "8",
            "--num-samples",
            "86524",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    elapsed = time.time() - start
    out = proc.stdout
    assert "4 nodes x 8 ranks = 32 ranks" in out
    assert "16/rank x 32 ranks x 1 accumulation = global 512" in out
    assert "86524 samples -> 168 steps/epoch, 508 dropped per epoch" in out
    assert "33600 steps = 200 x 168 steps/epoch (train.epochs); global batch 512" in out
    assert "memory / rank" in out and "communication / step" in out
    print(f"dry run took {elapsed:.1f} s")


def test_the_dry_run_plans_a_config_that_trains_with_small_images():
    """32 px, batch 8 (the demo's test size): the shuffle-BN estimate comes from a meta forward of two samples
    (train-mode BatchNorm refuses one) and equals the same sizes taken from a real eval-mode forward."""
    cfg = load_config("configs/demo.yaml", ["data.image_size=32", "data.batch_size=8"])
    text = build_plan(cfg, 1, 2, None, None).render()
    shuffle_mb = float(re.search(r"shuffle-BN ([\d.]+)", text).group(1))
    model = MoCoILM(cfg.model, cfg.moco, cfg.loss).eval()
    with torch.no_grad():
        features = sum(t.numel() for t in model.key_features(model.encoder, torch.zeros(1, 3, 32, 32)))
    low = DTYPES[precision_of(resolve_deepspeed_config(cfg.engine.deepspeed_config, 8))].itemsize
    expected = 0.5 * 8 * (3 * 32 * 32 * low + features * 4) / 1e6  # (R-1)/R of a rank's 8 samples, R = 2
    assert shuffle_mb == pytest.approx(expected, abs=0.05)


@pytest.mark.parametrize(("loss", "global_batch"), [("bt", True), ("bt", False), ("mse", False)])
def test_the_dry_run_counts_what_the_intermediate_loss_sends(loss, global_batch):
    """The Barlow Twins term on the global batch all-gathers both views' [blocks, batch, last projector width]
    projections: each of R ranks receives the other R-1 ranks' shares; the other losses send nothing."""
    overrides = [
        "data.image_size=32",
        "data.batch_size=8",
        f"loss.type={loss}",
        "loss.bt.proj_dims=[64, 2048]",
    ]
    cfg = load_config("configs/demo.yaml", [*overrides, f"loss.bt.global_batch={str(global_batch).lower()}"])
    text = build_plan(cfg, 1, 4, None, None).render()
    sent_mb = float(re.search(rf"{loss} loss ([\d.]+)", text).group(1))
    low = DTYPES[precision_of(resolve_deepspeed_config(cfg.engine.deepspeed_config, 8))].itemsize
    # 2 views x the 3 other ranks' 8 samples x 4 blocks x 2048 wide
    expected = 2 * 3 * 8 * 4 * 2048 * low / 1e6 if global_batch else 0.0
    assert sent_mb == pytest.approx(expected, abs=0.005)
