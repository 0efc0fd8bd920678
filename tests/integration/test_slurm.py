"""``launch/cluster/slurm.sbatch`` with stub ``srun``/``scontrol``: arguments arrive unchanged, nothing runs twice.

The stubs stand in for SLURM (``srun`` starts each task with SLURM's per-task variables) and the stub
launchers record the argv and environment they were started with, so the test sees exactly what
``launch/pretrain.py`` would receive on a cluster.
"""

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests.launcher import REPO

NODES = ["node001", "node002"]
HOSTILE = [
    "--config",
    "configs/nih/moco_bt.yaml",
    "output_dir=x;touch PWNED",
    "name=my run",
    "$(touch PWNED2)",
]

SRUN = """#!/usr/bin/env bash
# srun stub: run the command once per task, with SLURM's per-task variables and its own flags (SRUN_FLAGS)
flags=()
while [[ "$1" == --* ]]; do flags+=("$1"); shift; done
if [[ " ${flags[*]} " == *" --ntasks-per-node=1 "* ]]; then tasks=$SLURM_NNODES; per_node=1
else tasks=$SLURM_NTASKS; per_node=$((SLURM_NTASKS / SLURM_NNODES)); fi
for ((t = 0; t < tasks; t++)); do
  SRUN_FLAGS="${flags[*]}" SLURM_PROCID=$t SLURM_LOCALID=$((t % per_node)) SLURM_NODEID=$((t / per_node)) "$@" \
    || exit $?
done
"""
SCONTROL = (
    """#!/usr/bin/env bash
[ "$1 $2" = "show hostnames" ] && printf '%s\\n' """
    + " ".join(NODES)
    + "\n"
)
RECORDER = """#!/usr/bin/env python3
import json, os, sys
with open(os.environ["RECORD"], "a") as f:
    f.write(json.dumps({"argv": sys.argv[1:], "env": {k: v for k, v in os.environ.items() if k in
        ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_SIZE", "SRUN_FLAGS")},
        "hostfile": open(sys.argv[sys.argv.index("--hostfile") + 1]).read() if "--hostfile" in sys.argv else None}) + "\\n")
"""


def executable(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def cluster(tmp_path):
    """A submit directory with the repo's launch/ scripts, stub SLURM commands and stub launchers."""
    submit = tmp_path / "submit"
    shutil.copytree(REPO / "launch", submit / "launch")
    executable(submit / ".venv/bin/deepspeed", RECORDER)
    executable(submit / ".venv/bin/python", RECORDER)
    executable(tmp_path / "bin/srun", SRUN)
    executable(tmp_path / "bin/scontrol", SCONTROL)
    return submit, tmp_path / "bin"


def sbatch(cluster, mode: str, tasks: int, restarts: int = 0) -> list[dict]:
    submit, bin_dir = cluster
    record = submit.parent / "record.jsonl"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_SUBMIT_DIR": str(submit),
        "SLURM_JOB_NODELIST": "node[001-002]",
        "SLURM_JOB_ID": "4242",
        "SLURM_NNODES": str(len(NODES)),
        "SLURM_NTASKS": str(tasks),
        "SLURM_GPUS_ON_NODE": "4",
        "SLURM_RESTART_COUNT": str(restarts),
        "ILM_TASKS": mode,
        "RECORD": str(record),
    }
    env.pop("MASTER_PORT", None)
    proc = subprocess.run(
        ["bash", str(submit / "launch/cluster/slurm.sbatch"), *HOSTILE],
        cwd=submit.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert not list(submit.parent.rglob("PWNED*")), "an argument was run as a shell command"
    return [json.loads(line) for line in record.read_text().splitlines()]


def test_node_mode_passes_the_arguments_unchanged_and_removes_its_hostfile(cluster):
    calls = sbatch(cluster, "node", tasks=2)
    assert len(calls) == 2
    for node, call in enumerate(calls):
        argv = call["argv"]
        assert argv[argv.index("--node_rank") + 1] == str(node)
        assert argv[argv.index("--num_nodes") + 1] == "2"
        assert argv[argv.index("--num_gpus") + 1] == "4"
        assert argv[argv.index("--master_addr") + 1] == "node001"
        assert argv[argv.index("--master_port") + 1] == str(20000 + 4242 % 20000)
        assert argv[argv.index("launch/pretrain.py") + 1 :] == HOSTILE
        assert call["hostfile"] == "node001 slots=4\nnode002 slots=4\n"
    assert not list(cluster[0].glob(".hostfile.*"))


def test_gpu_mode_starts_every_rank_with_the_arguments_unchanged(cluster):
    calls = sbatch(cluster, "gpu", tasks=8, restarts=1)
    assert [c["env"]["RANK"] for c in calls] == [str(r) for r in range(8)]
    assert [c["env"]["LOCAL_RANK"] for c in calls] == [str(r % 4) for r in range(8)]
    assert {c["env"]["WORLD_SIZE"] for c in calls} == {"8"}
    # srun binds each task to its own cores, and a task is the only rank in its mask (no LOCAL_SIZE), so
    # ilm_dist's CPU placement gives each rank exactly the cores SLURM bound it to
    assert all(c["env"]["SRUN_FLAGS"] == "--cpu-bind=cores" and "LOCAL_SIZE" not in c["env"] for c in calls)
    for call in calls:
        assert call["argv"] == ["launch/pretrain.py", *HOSTILE, "--resume"]  # a requeued job resumes
