"""The backbone of the step with the lowest validation value, kept through checkpoints and resumes.

On every rank :class:`BestBackbone` tracks the best ``(step, value)`` of its metric (``val_loss`` or
``val_moco``, :func:`ilm_dist.train.validation.selection_metric`); rank 0 also keeps that step's backbone
(fp32, on the CPU) and writes it, when a new best arrives, to ``backbone_best.pt`` with ``best.json``
beside it (each written to a temporary file and renamed into place, the backbone first). The state,
backbone included, travels in the checkpoint's client state: a resumed run rewrites both files from the
checkpoint it continues from, so a best found after that checkpoint (in steps the resumed run discards)
never survives in them. At the end, ``train.export=best`` makes ``backbone.pt`` the best backbone and
``backbone_last.pt`` the last step's.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from torch import Tensor

from ilm_dist.serialization import save_tensors
from ilm_dist.train.health import NonFiniteLoss
from ilm_dist.train.run_dir import RunDir

log = logging.getLogger("ilm_dist")


class BestBackbone:
    """Lowest value of ``criterion["metric"]`` so far; ``criterion`` says what the value measures (metric,
    split, views, samples), and a checkpoint's best made under another criterion is not carried over."""

    def __init__(self, run: RunDir, criterion: dict[str, Any], is_main: bool):
        self.run, self.criterion, self.is_main = run, dict(criterion), is_main
        self.step: int | None = None
        self.epoch: int | None = None
        self.value = math.inf
        self.backbone: dict[str, Tensor] | None = None  # rank 0 only

    @property
    def metric(self) -> str:
        return self.criterion["metric"]

    def update(self, step: int, epoch: int, value: float, backbone: dict[str, Tensor] | None) -> bool:
        """Record ``value`` at ``step``; a new best (strictly lower, finite) is kept and written by rank 0.

        ``backbone``: the step's fp32 backbone state on rank 0 (None on the other ranks); it is copied, since
        on a CPU it may share memory with the weights that training goes on updating.
        """
        if not (math.isfinite(value) and value < self.value):
            return False
        self.step, self.epoch, self.value = step, epoch, value
        if self.is_main:
            self.backbone = {name: tensor.clone() for name, tensor in backbone.items()}
            self.write_files()
        return True

    def record(self) -> dict[str, Any] | None:
        """What ``best.json`` holds (None before the first finite value)."""
        if self.step is None:
            return None
        return {
            **self.criterion,
            "step": self.step,
            "epoch": self.epoch,
            "value": self.value,
            "backbone": RunDir.best_backbone.name,
        }

    def write_files(self) -> None:
        """Rank 0: ``backbone_best.pt`` then ``best.json``, each renamed into place."""
        write_atomic_tensors(self.backbone, self.run.best_backbone)
        path = self.run.best_record
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.record(), indent=2) + "\n")
        os.replace(tmp, path)

    def sync_files(self) -> None:
        """Rank 0 of a resumed run: make the files say what the restored state says."""
        if self.step is not None:
            self.write_files()
            return
        for path in (self.run.best_backbone, self.run.best_record):
            if path.exists():
                path.unlink()
                log.info("removed %s: written after the checkpoint this run resumes from", path.name)

    def state_dict(self) -> dict[str, Any] | None:
        """For the checkpoint's client state: the record and (rank 0) the best backbone; None before a best."""
        record = self.record()
        return None if record is None else {**record, "weights": self.backbone}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore a checkpoint's best; none (an older checkpoint, or validation newly turned on) or one
        measured under another criterion starts the selection afresh."""
        if state is None:
            return
        saved = {key: state.get(key) for key in self.criterion}
        if saved != self.criterion:
            log.warning(
                "the checkpoint's best backbone was selected by %s; this run selects by %s: selection starts "
                "afresh from the resumed step",
                saved,
                self.criterion,
            )
            return
        self.step, self.epoch, self.value = state["step"], state["epoch"], state["value"]
        self.backbone = state["weights"] if self.is_main else None

    def best_backbone(self) -> dict[str, Tensor] | None:
        """The best backbone (rank 0; None on the other ranks), for ``train.export=best``; raises
        :class:`NonFiniteLoss` on every rank when no value was finite."""
        if self.step is None:
            raise NonFiniteLoss(
                f"train.export=best: {self.metric} was never finite in this run, so there is no best backbone"
            )
        return self.backbone


def write_atomic_tensors(obj: Any, path: Path) -> None:
    """:func:`save_tensors` to a temporary file renamed over ``path``: a reader never sees a partial file."""
    tmp = path.with_name(f".{path.name}.tmp")
    save_tensors(obj, tmp)
    os.replace(tmp, path)
