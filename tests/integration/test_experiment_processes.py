"""The experiment command as users run it: a runner killed outright in the middle of a cell continues
without recomputing anything saved, and the experiment and the sweep command (``--address``) run on a
real local Ray cluster started with ``ray start --head``. The cells' logic is in test_experiment.py."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from ilm_dist.distributed import free_port
from ilm_dist.folder_lock import FolderBusy, FolderLock
from tests.eval.support import pack_dataset
from tests.experiment.test_experiment import DEMO, QUICK, experiment_dict, mtimes, write_experiment
from tests.launcher import REPO
from tests.tune.test_tune import write_sweep

RUNNER = [sys.executable, "launch/experiment.py"]
LINEAR = {"epochs": 1, "batch_size": 16, **QUICK}
# `ray start --head` turns on token authentication where a token exists (~/.ray/auth_token); a driver then
# sends it only with RAY_AUTH_MODE=token (Ray's documented setting; without it, ilm_dist.ray_connect says so)
RAY_ENV = (
    {**os.environ, "RAY_AUTH_MODE": "token"} if (Path.home() / ".ray" / "auth_token").is_file() else None
)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return pack_dataset(tmp_path_factory.mktemp("data"), {"train": 48, "val": 16, "test": 24}, num_classes=2)


def wait_for(predicate, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def cell_status(out: Path, cell: str) -> str | None:
    try:
        return json.loads((out / "state.json").read_text())["cells"][cell]["status"]
    except (OSError, ValueError, KeyError):  # not written yet, or being replaced
        return None


def lock_is_free(out: Path) -> bool:
    try:
        FolderLock(out, "test").release()
    except FolderBusy:
        return False
    return True


def history(out: Path) -> list[tuple[str, str]]:
    return [
        (r["cell"], r["event"]) for r in map(json.loads, (out / "history.jsonl").read_text().splitlines())
    ]


@pytest.mark.slow
def test_a_runner_killed_mid_cell_continues_without_recomputing(tmp_path, data):
    out = tmp_path / "out"
    raw = experiment_dict(
        data,
        out,
        methods={"random_init": {"config": str(DEMO), "weights": "random"}},
        evaluations={"probe": {"fractions": [0.5], "epochs": 2, **QUICK}, "linear": LINEAR},
    )
    path = write_experiment(tmp_path / "exp.yaml", raw)
    runner = subprocess.Popen([*RUNNER, "--config", str(path)], cwd=REPO, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: cell_status(out, "s0/random_init/linear") == "running", "the second cell to start")
    finally:
        runner.send_signal(signal.SIGKILL)  # no clean-up in the runner: its cell must die with it
        runner.wait()
    # the cell holds the experiment's lock until it is gone (it dies with its parent)
    wait_for(lambda: lock_is_free(out), "the killed runner's cell to exit", timeout=30)
    saved = mtimes(out)
    assert any("probe" in k and k.endswith("predictions.npz") for k in saved)

    again = subprocess.run([*RUNNER, "--config", str(path)], cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [k for k, v in saved.items() if mtimes(out)[k] != v] == []  # nothing saved was rewritten
    starts = [cell for cell, event in history(out) if event == "start"]
    assert starts == ["s0/random_init/probe_f0.5", "s0/random_init/linear", "s0/random_init/linear"]
    assert "1/2 cells done" in again.stderr.splitlines()[0]  # the progress line at the start
    assert "2/2 cells done, 0 running, 0 failed" in again.stderr
    assert (out / "report" / "summary.json").is_file()


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray head with 2 CPUs, stopped by terminating its ``ray start --block`` process (which stops
    what it started, and nothing of any other Ray on this machine)."""
    port = free_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    head = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("ray")),
            "start",
            "--head",
            f"--port={port}",
            "--num-cpus=2",
            f"--temp-dir={temp}",
            "--include-dashboard=false",
            "--disable-usage-stats",
            "--object-store-memory=100000000",
            "--block",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=RAY_ENV,
    )
    try:
        join = [
            sys.executable,
            "-c",
            f"from ilm_dist.ray_connect import init_ray; init_ray('127.0.0.1:{port}')",
        ]
        wait_for(lambda: subprocess.run(join, capture_output=True, env=RAY_ENV).returncode == 0, "Ray", 60)
        yield f"127.0.0.1:{port}"
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_the_experiment_runs_its_cells_as_tasks_on_a_ray_cluster(tmp_path, data, ray_cluster):
    out = tmp_path / "out"
    raw = experiment_dict(data, out, evaluations={"linear": LINEAR | {"fractions": [1.0]}})
    path = write_experiment(tmp_path / "exp.yaml", raw)
    run = subprocess.run(
        [*RUNNER, "--config", str(path), "--address", ray_cluster],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=RAY_ENV,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    cells = json.loads((out / "state.json").read_text())["cells"]
    assert {c: r["status"] for c, r in cells.items()} == {
        "s0/moco/pretrain": "done",
        "s0/moco/linear": "done",
        "s0/random_init/linear": "done",
    }
    events = history(out)
    # 1 CPU per cell on 2: random init's evaluation ran while MoCo pretrained; MoCo's waited for it
    assert events.index(("s0/random_init/linear", "start")) < events.index(("s0/moco/pretrain", "done"))
    assert events.index(("s0/moco/pretrain", "done")) < events.index(("s0/moco/linear", "start"))
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert [(c["a"], c["b"], c["eval"], c["fraction"]) for c in summary["comparisons"]] == [
        ("moco", "random_init", "linear", 1.0)
    ]


@pytest.mark.slow
def test_a_sweep_runs_on_a_ray_cluster_given_by_address(tmp_path, packed_tiny, ray_cluster):
    path = write_sweep(tmp_path / "sweep.yaml", packed_tiny, {"optim.lr": {"grid": [0.05]}})
    run = subprocess.run(
        [sys.executable, "launch/tune.py", "--config", str(path), "--address", ray_cluster],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=RAY_ENV,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "out" / "results.csv").open()))
    assert [row["status"] for row in rows] == ["completed"], rows
    assert 0 <= float(rows[0]["best_knn_acc_block4"]) <= 1
