"""Where an experiment stands: every cell's status in ``state.json``, each start and end in ``history.jsonl``.

``state.json`` is rewritten atomically (write + rename) at every change: ``{"experiment", "updated",
"cells": {id: {"kind", "status", "attempts", "seconds", "error", "log", "signature"}}}`` with status
``done``, ``running``, ``failed`` (with the error: exit status and the last lines of the cell's log),
``blocked`` (a cell it needs failed) or ``pending``. ``seconds`` is the duration of the cell's last
successful run, kept across runs of the experiment for the time estimate. A runner killed outright leaves
``running`` behind; the next run decides every cell again from the files on disk. ``history.jsonl`` only
grows: one record per start and end (cell, event, time, seconds, exit status), the log of what ran.

The folder's lock (:class:`ilm_dist.folder_lock.FolderLock`) keeps two runners out of one experiment
directory. The cells a runner starts inherit it, so a cell that outlives a killed runner still holds it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ilm_dist.eval.store import read_json, write_json
from ilm_dist.experiment.cells import Cell

STATUSES = ("done", "running", "failed", "blocked", "pending")


class State:
    def __init__(self, output: Path, name: str, cells: Iterable[Cell]):
        output.mkdir(parents=True, exist_ok=True)
        self.path, self.history = output / "state.json", output / "history.jsonl"
        self.name = name
        old = read_json(self.path)["cells"] if self.path.is_file() else {}
        self.cells: dict[str, dict[str, Any]] = {}
        for cell in cells:
            record = old.get(cell.id, {})
            self.cells[cell.id] = {
                "kind": cell.kind,
                "status": "pending",
                "attempts": record.get("attempts", 0),
                "seconds": record.get("seconds"),
                "error": None,
                "log": None,
                "signature": record.get("signature"),
            }
        self.started_at: dict[str, float] = {}

    def signature(self, cell_id: str) -> str | None:
        return self.cells[cell_id]["signature"]

    def status(self, cell_id: str) -> str:
        return self.cells[cell_id]["status"]

    def save(self) -> None:
        write_json(self.path, {"experiment": self.name, "updated": _now(), "cells": self.cells})

    def _event(self, cell_id: str, event: str, **extra: Any) -> None:
        with self.history.open("a") as f:
            f.write(json.dumps({"cell": cell_id, "event": event, "time": _now(), **extra}) + "\n")

    def mark_done(self, cell: Cell) -> None:
        """Found done on disk (saved by an earlier run)."""
        self.cells[cell.id] |= {"status": "done", "error": None}

    def start(self, cell: Cell, log: str) -> None:
        self.started_at[cell.id] = time.monotonic()
        record = self.cells[cell.id]
        record |= {"status": "running", "attempts": record["attempts"] + 1, "error": None, "log": log}
        self._event(cell.id, "start")
        self.save()

    def finish(self, cell: Cell, error: str | None, returncode: int) -> None:
        seconds = round(time.monotonic() - self.started_at.pop(cell.id), 3)
        record = self.cells[cell.id]
        if error is None:
            record |= {"status": "done", "seconds": seconds, "signature": cell.signature}
        else:
            record |= {"status": "failed", "error": error}
        self._event(cell.id, "done" if error is None else "failed", seconds=seconds, returncode=returncode)
        self.save()

    def interrupted(self, cell_id: str) -> None:
        self.started_at.pop(cell_id, None)
        self.cells[cell_id] |= {"status": "pending", "error": "interrupted"}
        self._event(cell_id, "interrupted")
        self.save()

    def block(self, cell_id: str, reason: str) -> None:
        self.cells[cell_id] |= {"status": "blocked", "error": reason}
        self.save()

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(STATUSES, 0)
        for record in self.cells.values():
            counts[record["status"]] += 1
        return counts

    def seconds_left(self) -> float | None:
        """Estimated seconds of work left: each pending or running cell at the mean duration of finished
        cells of its kind (else of all finished cells), less what a running cell has already run; None
        before any cell has a duration."""
        durations: dict[str, list[float]] = {}
        for record in self.cells.values():
            if record["seconds"] is not None:
                durations.setdefault(record["kind"], []).append(record["seconds"])
        if not durations:
            return None
        overall = sum(map(sum, durations.values())) / sum(map(len, durations.values()))
        now, left = time.monotonic(), 0.0
        for cell_id, record in self.cells.items():
            if record["status"] not in ("pending", "running"):
                continue
            kind = durations.get(record["kind"])
            estimate = sum(kind) / len(kind) if kind else overall
            if cell_id in self.started_at:
                estimate = max(0.0, estimate - (now - self.started_at[cell_id]))
            left += estimate
        return left

    def progress_line(self, parallel: int = 1) -> str:
        c = self.counts()
        total = sum(c.values())
        seconds = self.seconds_left()
        if seconds is None:
            eta = "time left unknown until a cell finishes"
        else:
            eta = f"about {_duration(seconds / max(1, parallel))} left"
            eta += f" at {parallel} cells at a time" if parallel > 1 else ""
        return (
            f"experiment {self.name}: {c['done']}/{total} cells done, {c['running']} running, {c['failed']} "
            f"failed, {c['blocked']} blocked, {c['pending']} to do; {eta}"
        )


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
