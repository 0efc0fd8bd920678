"""Run ilm_dist's entry points through the real DeepSpeed launcher on CPU (gloo)."""

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


def run_deepspeed(
    script: str, args: list[str], num_procs: int = 2, timeout: int = 600, check: bool = True, **env: str
) -> subprocess.CompletedProcess:
    """``deepspeed --num_gpus N script args`` with DS_ACCELERATOR=cpu; with ``check`` raises with the output."""
    for _ in range(2):  # once more when another process took the free port before the ranks bound it
        cmd = [str(DEEPSPEED), "--num_gpus", str(num_procs), "--master_port", str(free_port()), script, *args]
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


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a run's ``metrics.jsonl``."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
