"""What the start-up integrity check of a packed split costs (ilm_dist/data/integrity.py), side by side.

    python bench/shard_integrity.py --shards runs/data/idc_cpu --split train --rounds 3 \
        --out bench/results/shard_integrity_cpu.json

Per round, interleaved: ``load_manifest`` (JSON, counts, names and one stat per shard), the sample-key check
(every index file), the sha256 of every shard (one rank doing all of it), and, for scale, reading the same
bytes without hashing. Medians and ranges in seconds and MB/s; the JSON holds the CPU, the commit and the
command. The files are in the page cache after the first round: this measures hashing, not the disk.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from common import ROOT, cpu_description, source_commit, write_result

from ilm_dist.data.integrity import check_split_content
from ilm_dist.data.manifest import load_manifest


def read_only(paths: list[Path]) -> None:
    for path in paths:
        with open(path, "rb") as file:
            while file.read(1 << 20):
                pass


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=Path, required=True)
    parser.add_argument("--split", default="train")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/shard_integrity_cpu.json")
    args = parser.parse_args()
    manifest = load_manifest(args.shards)
    tars = [shard.tar for shard in manifest.split(args.split).shards]
    megabytes = sum(t.stat().st_size for t in tars) / 1e6
    variants = {
        "load_manifest": lambda: load_manifest(args.shards),
        "sample_keys": lambda: check_split_content(manifest, args.split, hash_shards=False),
        "keys_and_sha256": lambda: check_split_content(manifest, args.split, hash_shards=True),
        "read_without_hashing": lambda: read_only(tars),
    }
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            seconds[name].append(timed(fn))
    results = {
        name: {
            "median_s": statistics.median(times),
            "range_s": [min(times), max(times)],
            "mb_per_s": megabytes / statistics.median(times),
        }
        for name, times in seconds.items()
    }
    for name, r in results.items():
        print(f"{name:22s} {r['median_s'] * 1e3:9.1f} ms  ({megabytes / r['median_s']:8.0f} MB/s)")
    write_result(
        {
            "benchmark": "shard_integrity",
            "shards": str(args.shards),
            "split": args.split,
            "num_shards": len(tars),
            "megabytes": megabytes,
            "rounds": args.rounds,
            "results": results,
            "cpu": cpu_description(),
            "load_avg": os.getloadavg(),
            "commit": source_commit(
                "ilm_dist/data/integrity.py", "ilm_dist/data/manifest.py", "bench/shard_integrity.py"
            ),
            "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
