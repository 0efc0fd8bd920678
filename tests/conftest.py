"""Shared fixtures (a tiny packed synthetic dataset made by the real packer) and the suite's CPU placement."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ilm_dist.cpu_placement import apply_placement, plan_placement
from tests.launcher import REPO


def _worker_placement():
    """The test workers as the ranks of one node: each xdist worker gets its own cores and one thread
    per core; the ranks and loader workers a test launches inherit the worker's cores and place
    themselves within them (ilm_dist.cpu_placement), so the suite never runs more busy threads than cores
    beyond the ranks that one test starts on its worker's cores."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    index = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
    return plan_placement(workers, loader_workers=0), index


def pytest_configure(config: pytest.Config) -> None:
    placement, index = _worker_placement()
    apply_placement(placement, index)


def pytest_report_header(config: pytest.Config) -> str:
    workers = config.getoption("numprocesses", None)
    count = workers if isinstance(workers, int) and workers > 0 else 1
    return f"cpu placement of the test workers: {plan_placement(count, 0).describe()}"


@pytest.fixture(scope="session")
def packed_tiny(tmp_path_factory):
    """4 classes x 48 images of 32 px, 3 shards of train: ~150 train samples."""
    out = tmp_path_factory.mktemp("packed") / "tiny"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "data_tools.synthetic_dataset",
            str(out),
            "--num-classes",
            "4",
            "--per-class",
            "48",
            "--size",
            "32",
            "--shard-size",
            "64",
            "--workers",
            "1",
            "--quiet",
        ],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    return out


# The files that take longest (`make test` prints the slowest tests; paths under tests/), longest first.
# `make test` hands whole files to its workers in collection order (--no-loadscope-reorder); starting with the longest
# lets the workers finish together instead of one running a multi-minute file at the end alone.
LONGEST_FILES = (
    "integration/test_pretrain_distributed.py",
    "integration/test_eval_distributed.py",
    "integration/test_precision.py",
    "integration/test_run_safety.py",
    "integration/test_cluster.py",
    "integration/test_experiment_processes.py",
    "integration/test_tune_sweep.py",
    "integration/test_gpu_check.py",
    "integration/test_validation_loss.py",
    "experiment/test_experiment.py",
    "integration/test_bench_cpu_bound.py",
    "integration/test_shuffle_bn_distributed.py",
    "data_tools/test_pack_strict.py",
    "eval/test_pipeline.py",
    "integration/test_bench_throughput.py",
    "integration/test_bench_cpu_step.py",
    "integration/test_checkpoint_views.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    tests = Path(__file__).parent
    items.sort(key=lambda item: rank.get(item.path.relative_to(tests).as_posix(), len(LONGEST_FILES)))
