"""One trial: a short pretraining through ``launch/pretrain.py`` in a subprocess, reported to Tune.

The trial's resolved run config is written to ``<sweep>/trials/<trial id>/run.yaml`` and run there
(``deepspeed`` for more than one rank; ``DS_ACCELERATOR=cpu`` without GPUs). Each kNN monitor record
that appears in its ``metrics.jsonl`` is reported with the latest training loss, so the scheduler
can stop the trial early; the subprocess group is then terminated. A non-zero exit raises
:class:`TrialFailed` with the run's last output lines, which Tune records as the trial's error.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from ilm_dist.config import save_config
from ilm_dist.eval.monitor import is_monitor_record
from ilm_dist.processes import last_lines, launch, module_command
from ilm_dist.train.run_dir import RunDir
from ilm_dist.tune.spec import Sweep

POLL_S = 1.0
TAIL_LINES = 6


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
    follower = MetricsFollower(RunDir(run_dir).metrics)
    # the installed package runs from the trial directory: no checkout needed
    cmd, env = module_command(
        ["ilm_dist.pretrain", "--config", str(run_dir / "run.yaml")], sweep.settings.resources
    )
    with (run_dir / "log.txt").open("wb") as log, launch(cmd, env, run_dir, log) as proc:
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
