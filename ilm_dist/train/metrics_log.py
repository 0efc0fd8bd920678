"""Rank-0 metric sinks: ``metrics.jsonl`` (one JSON object per logged step) and TensorBoard."""

from __future__ import annotations

import json
from typing import Any

from ilm_dist.train.run_dir import RunDir


class MetricsLogger:
    """Appends from ``first_step`` on; TensorBoard drops its events from ``first_step`` on (a resumed run)."""

    def __init__(self, run: RunDir, enabled: bool, first_step: int = 1):
        self.enabled = enabled
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.path = run.metrics
        self.file = self.path.open("a")
        self.tb = SummaryWriter(str(run.tensorboard), purge_step=first_step)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float):
                self.tb.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tb.close()
