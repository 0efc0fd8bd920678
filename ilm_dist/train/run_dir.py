"""The run directory (``output_dir``) belongs to one run: a new run never writes over an earlier one.

A run without ``--resume`` refuses an ``output_dir`` that holds another run's files, unless asked to start
over (``--overwrite``), which removes exactly those files and says which. A resumed run keeps the earlier
files and drops the metric records logged after the checkpoint it continues from, so ``metrics.jsonl``
holds each step once.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from ilm_dist.errors import InputError

log = logging.getLogger("ilm_dist")

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
# Every file and folder a pretraining run writes into its output_dir.
RUN_FILES = (
    CONFIG,
    METRICS,
    "tensorboard",
    "checkpoints",
    "heartbeat",
    "backbone.pt",
    "backbone_best.pt",
    "backbone_last.pt",
    "best.json",
    "final_state.json",
    "knn_check.json",
    "resume_changes.jsonl",
)


def earlier_run_files(out: Path) -> list[str]:
    return [name for name in RUN_FILES if (out / name).exists()]


def prepare_fresh(out: Path, overwrite: bool) -> None:
    """Before a run that does not resume: refuse an ``output_dir`` holding a run, or empty it with ``overwrite``."""
    found = earlier_run_files(out)
    if not found:
        return
    if not overwrite:
        raise InputError(
            f"output_dir {out} holds an earlier run ({', '.join(found)}): continue it with --resume, "
            "choose another output_dir, or start over with --overwrite (which deletes those files)"
        )
    for name in found:
        path = out / name
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    log.warning("--overwrite: deleted the earlier run's %s from %s", ", ".join(found), out)


def keep_metrics_until(out: Path, step: int) -> int:
    """Drop the records of ``metrics.jsonl`` logged after ``step`` (atomically); returns how many went."""
    path = out / METRICS
    if not path.is_file():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if _step(line, path) <= step]
    if len(kept) < len(lines):
        tmp = path.with_name(f".{METRICS}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
    return len(lines) - len(kept)


def _step(line: str, path: Path) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        raise InputError(f"{path}: not a metrics record of ilm_dist (no 'step'): {line[:80]!r}") from None
