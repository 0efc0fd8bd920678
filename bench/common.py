"""What every benchmark script records: the device's name and the commit its numbers belong to."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def device_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name(device).lower()).strip("_")


def source_commit(*paths: str) -> str | None:
    """HEAD's hash; "uncommitted" when one of ``paths`` (the benchmarked sources) differs from HEAD."""
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    if head.returncode != 0:
        return None
    if paths:
        dirty = subprocess.run([*git, "status", "--porcelain", "--", *paths], capture_output=True, text=True)
        if dirty.returncode != 0 or dirty.stdout.strip():
            return "uncommitted"
    return head.stdout.strip()


def write_result(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
