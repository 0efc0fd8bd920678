"""Evaluation under the deepspeed launcher: 2 CPU ranks (gloo) against one process on the same inputs.

Probe: features are extracted in shards of whole batches and gathered, so they (and the probe fitted on
them) equal the single-process ones exactly. Fine-tuning: linear mode, where the frozen backbone's
BatchNorm uses its running statistics, so 2 ranks x 16 images with averaged gradients must train the
same head as 1 process x 32 (up to float rounding); the augmentations are seeded per sample.
"""

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from ilm_dist.eval.features import rank_shard
from tests.launcher import REPO, cpu_env, run_deepspeed

COMMON = [
    "--weights",
    "random",
    "--config",
    "configs/demo.yaml",
    "--bootstrap",
    "20",
    "--eval-batch-size",
    "8",
]
PROBE = ["--epochs", "3", "--evals", "2"]
FINETUNE = ["--mode", "linear", "--fractions", "1", "--epochs", "2", "--batch-size", "32", "--evals", "2"]
FINETUNE += ["--lr", "0.01"]  # large enough for the head to move visibly in 8 steps


def args(data, out, *extra) -> list[str]:
    return [*COMMON, *extra, "--out", str(out), f"data.shards={data}", "data.image_size=32"]


def one_process(script: str, argv: list[str]) -> subprocess.CompletedProcess:
    """``python script argv`` with the ranks' environment (one CPU thread), no launcher."""
    proc = subprocess.run(
        [sys.executable, script, *argv], cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")


def one_and_two_ranks(data, dirs, script: str, extra: list[str], result: str) -> tuple:
    """``script`` run by one process into the first of ``dirs`` and on two ranks into the second: the
    ``result`` folder of each."""
    for out, run in zip(dirs, (one_process, run_deepspeed), strict=True):
        run(script, args(data, out, *extra))
    return tuple(out / "random_init" / result for out in dirs)


@pytest.fixture(scope="module")
def probed(packed_tiny, dirs):
    return one_and_two_ranks(packed_tiny, dirs, "launch/probe.py", PROBE, "probe/f1")


@pytest.fixture(scope="module")
def finetuned(packed_tiny, dirs):
    return one_and_two_ranks(packed_tiny, dirs, "launch/finetune.py", FINETUNE, "finetune/linear_f1")


def read(path):
    return json.loads(path.read_text())


@pytest.mark.parametrize(
    ("num_samples", "batch_size", "world_size"),
    [(20, 8, 2), (152, 8, 2), (5, 8, 2), (100, 7, 3), (3, 1, 4), (1, 4, 4), (0, 4, 2), (64, 16, 1)],
)
def test_rank_shards_are_whole_batches_covering_every_sample_once(num_samples, batch_size, world_size):
    shards = [
        range(num_samples)[rank_shard(num_samples, batch_size, r, world_size)] for r in range(world_size)
    ]
    assert [i for shard in shards for i in shard] == list(range(num_samples))
    assert all(shard.start % batch_size == 0 for shard in shards if len(shard))
    batches = [-(-len(shard) // batch_size) for shard in shards]
    assert max(batches) - min(batches) <= 1


@pytest.mark.slow
def test_probe_on_two_ranks_equals_one_process(probed):
    one, two = probed
    for split in ("train", "val", "test"):
        a, b = np.load(one / f"features_{split}.npz"), np.load(two / f"features_{split}.npz")
        assert sorted(a.files) == sorted(b.files) == ["block1", "block2", "block3", "block4", "labels"]
        for key in a.files:  # same rows in the same order: every sample once, no padding
            np.testing.assert_array_equal(b[key], a[key], err_msg=f"{split} {key}")
    want, got = read(one / "metrics.json"), read(two / "metrics.json")
    assert got["blocks"] == want["blocks"]
    assert got["subset"] == want["subset"] and got["test"] == want["test"]
    assert got["backbone_sha256"] == want["backbone_sha256"]


@pytest.mark.slow
def test_linear_finetuning_on_two_ranks_equals_one_process(finetuned):
    one, two = finetuned
    a, b = np.load(one / "predictions.npz"), np.load(two / "predictions.npz")
    np.testing.assert_array_equal(b["labels"], a["labels"])
    np.testing.assert_allclose(b["logits"], a["logits"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(b["probs"], a["probs"], rtol=1e-4, atol=1e-6)
    fa, fb = np.load(one / "features_test.npz"), np.load(two / "features_test.npz")
    for key in fa.files:  # frozen backbone: identical
        np.testing.assert_array_equal(fb[key], fa[key])
    want, got = read(one / "metrics.json"), read(two / "metrics.json")
    assert got["fit"]["steps"] == want["fit"]["steps"] == 2 * (152 // 32)
    assert got["fit"]["best_step"] == want["fit"]["best_step"]
    for g, w in zip(got["fit"]["history"], want["fit"]["history"], strict=True):
        assert g["step"] == w["step"]
        assert g["train_loss"] == pytest.approx(w["train_loss"], rel=1e-5)
        assert g["val"] == pytest.approx(w["val"], rel=1e-5, abs=1e-6)
    assert got["fit"]["history"][0]["train_loss"] != pytest.approx(got["fit"]["history"][-1]["train_loss"])
    assert got["metrics"] == pytest.approx(want["metrics"], rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_live_probe_on_two_ranks_equals_one_process(packed_tiny, tmp_path):
    """The probe that runs the frozen network at every step (augmented views) trains data-parallel: with
    BatchNorm on running statistics 2 ranks x 16 images train the heads of 1 process x 32."""
    live = ["--train-aug", "moco", "--no-standardise", "--epochs", "1", "--batch-size", "32", "--evals", "2"]
    one_process("launch/probe.py", args(packed_tiny, tmp_path / "one", *live))
    run_deepspeed("launch/probe.py", args(packed_tiny, tmp_path / "two", *live))
    want, got = (read(tmp_path / d / "random_init/probe/f1/metrics.json") for d in ("one", "two"))
    for block, result in want["blocks"].items():
        assert got["blocks"][block]["fit"]["steps"] == result["fit"]["steps"] == 152 // 32
        for g, w in zip(got["blocks"][block]["fit"]["history"], result["fit"]["history"], strict=True):
            assert g["train_loss"] == pytest.approx(w["train_loss"], rel=1e-5), block
        assert got["blocks"][block]["metrics"] == pytest.approx(result["metrics"], rel=1e-4, abs=1e-5), block


@pytest.mark.slow
def test_saved_results_are_reused_by_every_rank(packed_tiny, dirs, probed):
    _, two = probed
    files = sorted(two.iterdir())
    stamps = [f.stat().st_mtime_ns for f in files]
    proc = run_deepspeed("launch/probe.py", args(packed_tiny, dirs[1], *PROBE))
    assert "already done" in proc.stdout + proc.stderr
    assert sorted(two.iterdir()) == files
    assert [f.stat().st_mtime_ns for f in files] == stamps


@pytest.mark.slow
def test_analyse_runs_under_the_launcher(dirs, probed, finetuned, tmp_path):
    proc = run_deepspeed(
        "launch/analyse.py",
        [str(dirs[1]), "--out", str(tmp_path), "--cka-subsets", "2", "--cka-subset-size", "8"],
    )
    assert proc.stdout.count("report: ") == 1  # rank 0 only
    assert (tmp_path / "report.md").is_file()


@pytest.mark.slow
def test_bad_input_exits_2_on_every_rank_without_hanging(packed_tiny, tmp_path):
    # the subset is drawn on rank 0 only: its error must reach rank 1, not leave it waiting
    start = time.monotonic()
    proc = run_deepspeed(
        "launch/probe.py", args(packed_tiny, tmp_path, "--fraction", "0.01"), check=False, timeout=300
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-4000:]
    assert "error: label fraction 0.01 leaves class" in output
    assert "Traceback" not in output
    assert time.monotonic() - start < 200
