"""What every benchmark script shares: the device's name, the commit its numbers belong to, result files."""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from ilm_dist.cpu_placement import available_cores, cpu_flags

ROOT = Path(__file__).resolve().parent.parent


def device_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name(device).lower()).strip("_")


def source_commit(*paths: str) -> str | None:
    """HEAD's hash; "uncommitted" when one of ``paths`` (the benchmarked sources) differs from HEAD.

    In a copy without git history (a GPU node receives the working tree only), ``$ILM_DIST_COMMIT`` as
    the sender set it (bench/gpu_check.py plan), else None.
    """
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    if head.returncode != 0:
        return os.environ.get("ILM_DIST_COMMIT")
    if paths:
        dirty = subprocess.run([*git, "status", "--porcelain", "--", *paths], capture_output=True, text=True)
        if dirty.returncode != 0 or dirty.stdout.strip():
            return "uncommitted"
    return head.stdout.strip()


def add_val_split_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of every val-split script: the run config and its overrides (what
    :func:`val_split_record` records), the label fractions and the JSON file."""
    parser.add_argument("--config", required=True, help="run config (data.shards, image size, aug, arch)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.06, 1.0])
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default: print only)")
    parser.add_argument("overrides", nargs="*", help="run-config key=value overrides")


def val_split_record(
    script: str, argv: list[str] | None, start: float, config: str, overrides: list[str]
) -> dict:
    """The head of a val-split script's JSON (recipe_probe, eval_budget, probe_budget): command, commit,
    device, the run config with its overrides, the splits read (never test) and the seconds since ``start``."""
    return {
        "command": " ".join(["python", f"bench/{script}", *(argv if argv is not None else sys.argv[1:])]),
        "commit": source_commit(f"bench/{script}", "ilm_dist"),
        "device": "cpu",
        "config": config,
        "overrides": overrides,
        "splits": ["train", "val"],
        "seconds": round(time.time() - start, 1),
    }


def write_result(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


def release(device: torch.device) -> None:
    """Free what the last variant left behind before the next one is measured."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def cpu_description() -> dict:
    model = platform.processor()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), model)
    flags = cpu_flags()
    return {
        "model": model,
        "cores": len(available_cores()),
        "amx_bf16": "amx_bf16" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
