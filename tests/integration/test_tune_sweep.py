"""A tiny CPU sweep through Ray Tune's ASHA: failures recorded, a runnable best config, no silent overwrite."""

import csv
import subprocess
import sys

import pytest

from ilm_dist.config import load_config
from tests.launcher import REPO
from tests.tune.test_tune import write_sweep


@pytest.mark.slow
def test_tiny_cpu_sweep_records_failures_and_exports_a_runnable_best_config(tmp_path, packed_tiny):
    nowhere = tmp_path / "nowhere"  # passes the space check, fails in the run: no packed data there
    space = {
        "loss.type": {"grid": ["mse", "bt"]},
        "data.shards": {"grid": [str(packed_tiny), str(nowhere)]},
        "loss.blocks": {"choice": [[4], [3, 4], [1, 2, 3, 4]]},
        **{f"loss.weights.block{b}": {"loguniform": [0.01, 1.0]} for b in (1, 2, 3, 4)},
        "optim.lr": {"loguniform": [0.01, 0.5]},
    }
    path = write_sweep(tmp_path / "sweep.yaml", packed_tiny, space)
    cmd = [sys.executable, "launch/tune.py", "--config", str(path), "--num-cpus", "2"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 4
    for row in rows:
        if row["data.shards"] == str(nowhere):
            assert row["status"] == "error"
            assert f"{nowhere}/manifest.json: not found" in row["error"], row["error"]
        else:
            assert row["status"] in ("completed", "stopped"), row
            assert row["error"] == "" and 0 <= float(row["best_knn_acc_block4"]) <= 1
            run = load_config(f"{row['run_dir']}/run.yaml")
            assert len(run.loss.weights) == len(run.loss.blocks) and run.loss.type == row["loss.type"]
    assert any(row["status"] == "completed" for row in rows)
    assert (out / "results.png").stat().st_size > 0

    best = out / "best.yaml"
    run_dir = tmp_path / "best_run"
    subprocess.run(
        [
            sys.executable,
            "launch/pretrain.py",
            "--config",
            str(best),
            "train.max_steps=1",
            f"output_dir={run_dir}",
        ],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert (run_dir / "final_state.json").exists()

    # the finished sweep is not overwritten: continuing it needs --resume
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "pass --resume to continue it" in again.stderr
