"""A pretraining command reads the packed set's manifest.json once: its preflight hands it to the trainer."""

import json
import subprocess
import sys

import pytest

from tests.launcher import REPO

pytestmark = pytest.mark.slow

COUNTING = """
import json, sys
import ilm_dist.data.manifest as manifest_module
calls = []
original = manifest_module.load_manifest
def counting(*args, **kwargs):
    calls.append(str(args[0]))
    return original(*args, **kwargs)
manifest_module.load_manifest = counting  # before any module imports it by name
from ilm_dist.pretrain import pretrain_main
try:
    pretrain_main(sys.argv[1:])
except SystemExit as stop:
    print(json.dumps({"code": stop.code, "loads": calls}))
"""


def test_one_process_run_loads_the_manifest_once(packed_tiny, tmp_path):
    args = [
        *("--config", "configs/demo.yaml", f"output_dir={tmp_path / 'run'}", f"data.shards={packed_tiny}"),
        *("data.image_size=32", "data.batch_size=8", "data.num_workers=0", "moco.queue_size=32"),
        "train.max_steps=1",
    ]
    proc = subprocess.run(
        [sys.executable, "-c", COUNTING, *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"code": 0, "loads": [str(packed_tiny)]}, proc.stderr[-3000:]
