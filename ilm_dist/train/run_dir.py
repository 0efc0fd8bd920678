"""The folder of one pretraining run (``output_dir``): :class:`RunDir` owns every name in it.

A new run never writes over an earlier one: a run without ``--resume`` refuses an ``output_dir`` that holds
another run's files, unless asked to start over (``--overwrite``), which removes exactly those files and says
which. A resumed run keeps the earlier files and drops the metric records logged after the checkpoint it
continues from, so ``metrics.jsonl`` holds each step once.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import overload

from ilm_dist.errors import InputError

log = logging.getLogger("ilm_dist")


class _Member:
    """A file or folder of every run: ``RunDir.<member>.name`` is its name, ``run.<member>`` its path."""

    def __init__(self, name: str):
        self.name = name

    @overload
    def __get__(self, run: None, owner: type) -> _Member: ...

    @overload
    def __get__(self, run: RunDir, owner: type) -> Path: ...

    def __get__(self, run: RunDir | None, owner: type) -> _Member | Path:
        return self if run is None else run.root / self.name


class RunDir:
    """``root``, the folder a pretraining run writes; each member's path is ``root / <its name>``. Components
    (checkpoints, metrics, health, selection, the resume check) and the commands that read runs get this
    object, never a name of their own (the lock file is :mod:`ilm_dist.folder_lock`'s, as for every folder)."""

    config = _Member("config.yaml")  # the resolved run config
    metrics = _Member("metrics.jsonl")  # one JSON record per logged step
    tensorboard = _Member("tensorboard")
    checkpoints = _Member("checkpoints")  # step_<N>/ folders and `latest`
    heartbeats = _Member("heartbeat")  # rank<r> files
    backbone = _Member("backbone.pt")  # the exported backbone
    best_backbone = _Member("backbone_best.pt")
    last_backbone = _Member("backbone_last.pt")  # with train.export=best; backbone.pt is then the best one
    best_record = _Member("best.json")
    final_state = _Member("final_state.json")  # written last: the run completed
    knn_check = _Member("knn_check.json")
    resume_changes = _Member("resume_changes.jsonl")

    LATEST = "latest"  # in checkpoints/: the tag of the last complete checkpoint
    TAG = re.compile(r"^step_(\d+)$")  # a checkpoint's folder in checkpoints/

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """Every file and folder a pretraining run writes into its folder, in declaration order."""
        return tuple(m.name for m in vars(cls).values() if isinstance(m, _Member))

    @property
    def latest(self) -> Path:
        return self.checkpoints / self.LATEST

    def checkpoint(self, step_or_tag: int | str) -> Path:
        """The folder of the checkpoint of a step (``step_<N>``), or of a tag as ``latest`` names it."""
        tag = step_or_tag if isinstance(step_or_tag, str) else f"step_{step_or_tag}"
        return self.checkpoints / tag

    def latest_tag(self) -> str | None:
        """What ``checkpoints/latest`` says (None without one); not checked to be a tag."""
        return self.latest.read_text(errors="replace").strip() if self.latest.is_file() else None

    def heartbeat(self, rank: int) -> Path:
        return self.heartbeats / f"rank{rank}"

    def earlier_run_files(self) -> list[str]:
        return [name for name in self.names() if (self.root / name).exists()]

    def prepare_fresh(self, overwrite: bool) -> None:
        """Before a run that does not resume: refuse a folder holding a run, or empty it with ``overwrite``."""
        out, found = self.root, self.earlier_run_files()
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

    def keep_metrics_until(self, step: int) -> int:
        """Drop the records of ``metrics.jsonl`` logged after ``step`` (atomically); returns how many went."""
        path = self.metrics
        if not path.is_file():
            return 0
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        kept = [line for line in lines if _step(line, path) <= step]
        if len(kept) < len(lines):
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, path)
        return len(lines) - len(kept)


def _step(line: str, path: Path) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        raise InputError(f"{path}: not a metrics record of ilm_dist (no 'step'): {line[:80]!r}") from None
