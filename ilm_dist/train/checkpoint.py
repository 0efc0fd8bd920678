"""Checkpoints: DeepSpeed's engine state plus the MoCo state it does not know about.

Layout: ``output_dir/checkpoints/step_<N>/`` (DeepSpeed's files) with ``moco_state.pt`` (key
encoder, queue, pointer, data position) written by rank 0 *before* DeepSpeed's ``latest`` file
moves to the new tag, so ``latest`` only ever names a complete checkpoint. Older tags beyond
``keep`` are deleted after the new one is complete.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from ilm_dist import distributed as D

TAG = re.compile(r"^step_(\d+)$")
MOCO_STATE = "moco_state.pt"


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def save(engine, output_dir: str | Path, step: int, moco_state: dict[str, Any], keep: int) -> Path:
    root = checkpoint_dir(output_dir)
    tag = f"step_{step}"
    if D.rank() == 0:
        (root / tag).mkdir(parents=True, exist_ok=True)
        tmp = root / tag / f"{MOCO_STATE}.tmp"
        torch.save(moco_state, tmp)
        os.replace(tmp, root / tag / MOCO_STATE)
    D.barrier()
    engine.save_checkpoint(str(root), tag=tag)  # writes `latest` last
    D.barrier()
    if D.rank() == 0:
        _rotate(root, keep)
    return root / tag


def _rotate(root: Path, keep: int) -> None:
    tags = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := TAG.match(p.name)))
    for _, path in tags[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def latest_tag(output_dir: str | Path) -> str | None:
    latest = checkpoint_dir(output_dir) / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def load(engine, output_dir: str | Path) -> dict[str, Any]:
    """Restore the engine from the latest complete checkpoint; returns its MoCo state."""
    tag = latest_tag(output_dir)
    if tag is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {checkpoint_dir(output_dir)} (no 'latest' file)")
    root = checkpoint_dir(output_dir)
    path, _ = engine.load_checkpoint(str(root), tag=tag)
    if path is None:
        raise FileNotFoundError(f"--resume: DeepSpeed could not load {root / tag}")
    return torch.load(root / tag / MOCO_STATE, map_location="cpu", weights_only=False)
