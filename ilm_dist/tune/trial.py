"""One trial: a short pretraining through ``launch/pretrain.py`` in a subprocess, reported to Tune.

The trial's resolved run config is written to ``<sweep>/trials/<trial id>/run.yaml`` and run there
(``deepspeed`` for more than one rank; ``DS_ACCELERATOR=cpu`` without GPUs). Each kNN monitor record
that appears in its ``metrics.jsonl`` is reported with the latest training loss, so the scheduler
can stop the trial early; the subprocess group is then terminated. A non-zero exit raises
:class:`TrialFailed` with the run's last output lines, which Tune records as the trial's error.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from ilm_dist.config import save_config
from ilm_dist.distributed import free_port
from ilm_dist.eval.monitor import is_monitor_record
from ilm_dist.tune.spec import ResourcesConfig, Sweep

POLL_S = 1.0
TAIL_LINES = 6
STOP_GRACE_S = 10.0


class TrialFailed(RuntimeError):
    """The pretraining subprocess exited non-zero; the message ends with its last output lines."""


def run_trial(config: dict[str, Any], sweep: Sweep) -> None:
    """Tune function trainable: ``config`` is one sample of the search space."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    run_dir = sweep.trials_dir / trial_id
    shutil.rmtree(run_dir, ignore_errors=True)  # a restarted trial starts over
    run_dir.mkdir(parents=True)
    cfg = sweep.run_config(config, run_dir, f"{sweep.settings.name}_{trial_id}")
    save_config(cfg, run_dir / "run.yaml")
    follower = MetricsFollower(run_dir / "metrics.jsonl")
    with (
        (run_dir / "log.txt").open("wb") as log,
        launch(run_dir / "run.yaml", sweep.settings.resources, log) as proc,
    ):
        while True:
            exited = proc.poll() is not None
            for record in follower.poll():
                tune.report(record)
            if exited:
                break
            time.sleep(POLL_S)
    if proc.returncode != 0:
        tail = " | ".join(last_lines(run_dir / "log.txt", TAIL_LINES))
        raise TrialFailed(f"pretraining exited with code {proc.returncode}: {tail}")


def command(run_yaml: Path, resources: ResourcesConfig) -> tuple[list[str], dict[str, str]]:
    """The pretraining command and environment for one trial on the GPUs Ray assigned (if any)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["OMP_NUM_THREADS"] = str(max(1, int(resources.cpus // resources.num_ranks)))
    module = ["ilm_dist.pretrain", "--config", str(run_yaml)]  # the installed package, no checkout needed
    if resources.num_ranks == 1:
        cmd = [sys.executable, "-m", *module]
    else:
        deepspeed = [str(Path(sys.executable).with_name("deepspeed")), "--master_port", str(free_port())]
        if resources.gpus == 0:  # with GPUs, deepspeed takes Ray's CUDA_VISIBLE_DEVICES as is
            env["DS_ACCELERATOR"] = "cpu"
            deepspeed += ["--num_gpus", str(resources.num_ranks)]
        cmd = [*deepspeed, "--module", *module]
    if shutil.which("setpriv"):  # the run dies with the trial even when Ray kills the worker outright
        cmd = ["setpriv", "--pdeathsig", "TERM", "--", *cmd]
    return cmd, env


@contextlib.contextmanager
def launch(run_yaml: Path, resources: ResourcesConfig, log: IO[bytes]) -> Iterator[subprocess.Popen]:
    """Run the trial's pretraining in its own process group; terminate the group on the way out."""
    cmd, env = command(run_yaml, resources)
    proc = subprocess.Popen(
        cmd, cwd=run_yaml.parent, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            _stop_group(proc)


def _stop_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=STOP_GRACE_S)
            return
        except subprocess.TimeoutExpired:
            continue


class MetricsFollower:
    """Reads the complete lines appended to ``metrics.jsonl`` since the last poll."""

    def __init__(self, path: Path):
        self.path, self.offset, self.loss = path, 0, None

    def poll(self) -> list[dict[str, Any]]:
        """The new kNN monitor records, each with the latest training loss and step."""
        if not self.path.exists():
            return []
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        reports = []
        for record in map(json.loads, complete.splitlines()):
            if "loss" in record:
                self.loss = record["loss"]
            elif is_monitor_record(record):
                reports.append({**record, "loss": self.loss})
        return reports


def last_lines(path: Path, n: int) -> list[str]:
    """The last ``n`` non-empty lines of a log (progress-bar carriage returns split lines too)."""
    text = path.read_bytes()[-20000:].decode(errors="replace").replace("\r", "\n")
    return [line.strip() for line in text.splitlines() if line.strip()][-n:]
