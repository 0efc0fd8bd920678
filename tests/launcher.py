"""Run ilm_dist's entry points through the real DeepSpeed launcher on CPU (gloo).

DeepSpeed starts a node's ranks in two processes: the ``deepspeed`` command (``launcher/runner.py``: the
hostfile, ``--num_gpus``, the world description) starts ``python -m deepspeed.launcher.launch`` with the
world encoded in ``--world_info``, and that node launcher starts, watches and stops the ranks. On one node the
runner only execs the node launcher with its own environment, and costs a process that imports torch and
DeepSpeed (about 2 s of a core) per run: :func:`run_deepspeed` starts the node launcher directly, as the
runner would, unless ``runner=True`` (the tests of the ``deepspeed`` command itself: hostfiles, SLURM, the
README's command).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ilm_dist.distributed import free_port

REPO = Path(__file__).resolve().parent.parent
DEEPSPEED = Path(sys.executable).with_name("deepspeed")


def cpu_env(**extra: str) -> dict[str, str]:
    """The launcher's environment for CPU ranks; their threads and cores come from the placement
    (ilm_dist.cpu_placement), within the cores of the test worker that launches them."""
    return {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", **extra}


def launcher_command(num_procs: int, port: int, runner: bool) -> list[str]:
    """``deepspeed --num_gpus N --master_port P``, or the node-launcher command the runner would run for it."""
    if runner:
        return [str(DEEPSPEED), "--num_gpus", str(num_procs), "--master_port", str(port)]
    from deepspeed.launcher.runner import encode_world_info  # the runner's own encoding of the world

    world = encode_world_info({"localhost": list(range(num_procs))})
    return [
        *(sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world}"),
        *(
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
            "--enable_each_rank_log=None",
            "--log_level=info",
        ),
    ]


def run_deepspeed(
    script: str,
    args: list[str],
    num_procs: int = 2,
    timeout: int = 600,
    check: bool = True,
    runner: bool = False,
    **env: str,
) -> subprocess.CompletedProcess:
    """``deepspeed --num_gpus N script args`` with DS_ACCELERATOR=cpu (the node launcher it starts, unless
    ``runner``); with ``check`` raises with the output."""
    for _ in range(2):  # once more when another process took the free port before the ranks bound it
        cmd = [*launcher_command(num_procs, free_port(), runner), script, *args]
        proc = subprocess.run(
            cmd, cwd=REPO, env=cpu_env(**env), capture_output=True, text=True, timeout=timeout
        )
        if "EADDRINUSE" not in proc.stdout + proc.stderr:
            break
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


def run_bench(script: str, args: list[str], out: Path) -> dict:
    """``python bench/<script> args`` from the repository root (it must succeed): the JSON it wrote to ``out``."""
    proc = subprocess.run(
        [sys.executable, f"bench/{script}", *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a run's ``metrics.jsonl``."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
