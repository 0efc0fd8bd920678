"""Pieces shared by the packing CLIs: argument types, common options, and the run/summary wrapper."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ilm_dist.errors import EXIT_INPUT_ERROR, InputError


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Options every writer takes: seed, JPEG quality, sharding, parallelism, output handling."""
    group = parser.add_argument_group("output")
    group.add_argument("--seed", type=int, default=0, help="seed for splits and sample order")
    group.add_argument("--jpeg-quality", type=positive_int, default=95)
    group.add_argument("--shard-size", type=positive_int, default=1000, help="samples per shard")
    group.add_argument("--workers", type=positive_int, default=min(8, os.cpu_count() or 1))
    group.add_argument("--overwrite", action="store_true", help="replace an existing packed dataset")
    group.add_argument("--quiet", action="store_true", help="no progress bars")


def run(job: Callable[[argparse.Namespace], dict], args: argparse.Namespace) -> int:
    """Run ``job`` (which returns the manifest); print a summary, or ``error: ...`` and return 2."""
    start = time.perf_counter()
    try:
        manifest = job(args)
    except InputError as err:  # PackError, ManifestError, a folder in use (FolderBusy)
        print(f"error: {err}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except OSError as err:  # one the packer did not expect (its writes name their file themselves)
        where = f"{err.filename}: " if err.filename else ""
        print(f"error: {where}{err.strerror or err}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except KeyboardInterrupt:
        print(f"interrupted: nothing was written, {args.out_dir} is as it was", file=sys.stderr)
        return EXIT_INPUT_ERROR
    print(summary(manifest, args.out_dir, time.perf_counter() - start))
    return 0


def summary(manifest: dict, out_dir: Path, seconds: float) -> str:
    splits = manifest["splits"]
    counts = ", ".join(f"{name} {entry['num_samples']}" for name, entry in splits.items())
    shards = [shard for entry in splits.values() for shard in entry["shards"]]
    megabytes = sum(shard["bytes"] for shard in shards) / 1e6
    return (
        f"packed {sum(e['num_samples'] for e in splits.values())} samples ({counts}), "
        f"{manifest['task']} {manifest['image_mode']}, {len(shards)} shards, {megabytes:.1f} MB, "
        f"{manifest['skipped']['count']} skipped, {seconds:.1f} s -> {out_dir}"
    )
