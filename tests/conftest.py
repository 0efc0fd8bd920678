"""Shared fixtures: a tiny packed synthetic dataset made by the real packer."""

import subprocess
import sys

import pytest

from tests.launcher import REPO


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
