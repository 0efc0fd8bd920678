"""Checkpoints: DeepSpeed's engine state plus the MoCo state it does not know about.

Layout: ``output_dir/checkpoints/step_<N>/`` (DeepSpeed's files) with ``moco_state.pt`` (key
encoder, queue, pointer, data position). ``latest`` is replaced atomically (write + rename) only
after every rank has finished writing, so a crash during a save leaves it naming the previous
complete checkpoint. Older tags beyond ``keep`` are deleted after the new one is complete.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from ilm_dist import distributed as D
from ilm_dist.train import faults

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
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    D.barrier()
    faults.maybe_kill("save", step)
    if D.rank() == 0:
        _write_atomic(root / "latest", tag)
        _rotate(root, keep)
    D.barrier()
    return root / tag


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _rotate(root: Path, keep: int) -> None:
    tags = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := TAG.match(p.name)))
    for _, path in tags[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def latest_tag(output_dir: str | Path) -> str | None:
    latest = checkpoint_dir(output_dir) / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def load_moco_state(output_dir: str | Path) -> tuple[str, dict[str, Any]]:
    """The latest complete checkpoint's tag and MoCo state."""
    tag = latest_tag(output_dir)
    if tag is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {checkpoint_dir(output_dir)} (no 'latest' file)")
    path = checkpoint_dir(output_dir) / tag / MOCO_STATE
    return tag, torch.load(path, map_location="cpu", weights_only=False)


def load_engine(engine, output_dir: str | Path, tag: str, same_world: bool) -> None:
    """Restore DeepSpeed's state. On another world size ZeRO's optimizer partitions do not fit,
    so only the module and the LR schedule are restored (the optimizer's momentum restarts)."""
    root = checkpoint_dir(output_dir)
    zero = engine.zero_optimization_stage() > 0
    path, _ = engine.load_checkpoint(
        str(root),
        tag=tag,
        load_optimizer_states=same_world or not zero,
        load_module_only=not same_world and zero,
    )
    if path is None:
        raise FileNotFoundError(f"--resume: DeepSpeed could not load {root / tag}")
