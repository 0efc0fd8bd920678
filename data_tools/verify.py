"""Check a packed dataset against its manifest and report every mismatch.

Usage::

    python -m data_tools.verify OUT_DIR [--workers N] [--quiet]

Checks: the manifest loads (`ilm_dist.data.manifest.load_manifest`); every shard exists, has the recorded
sha256 and sample count, and its ``.idx`` equals what DALI's ``wds2idx`` would write; every sample has
exactly ``.jpg``/``.json``/``.lbl`` and a ``{split}_{8 digits}`` key unique in the dataset; the JPEG decodes
in the manifest's ``image_mode``; the label fits the task and class count and matches the ``.json`` labels;
per-split sample and class counts; groups are disjoint across splits when the packer made group-disjoint
splits; no unlisted files.  Exit status 0 when everything agrees, 1 otherwise.
"""

from __future__ import annotations

import io
import os
import sys
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from data_tools.command import positive_int
from data_tools.parallel import parallel_map
from data_tools.shard_writer import sha256_file
from ilm_dist.data.manifest import Manifest, ManifestError, ShardInfo, load_manifest
from ilm_dist.data.shard_format import COMPONENTS, LabelSpace, index_text, is_sample_key, iter_samples
from ilm_dist.errors import ArgumentParser
from ilm_dist.strict import load_json


@dataclass(frozen=True)
class ShardTask:
    shard: ShardInfo
    split: str
    labels: LabelSpace
    image_mode: str


@dataclass
class ShardCheck:
    problems: list[str] = field(default_factory=list)
    num_samples: int = 0
    labels: list[tuple[int, ...]] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    groups: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class SampleCheck:
    problems: list[str]
    labels: tuple[int, ...] | None = None
    group: str | None = None


def check_shard(task: ShardTask) -> ShardCheck:
    """Everything that can be checked from one shard alone."""
    check = ShardCheck()
    shard, name = task.shard, task.shard.tar.name
    if not shard.tar.is_file():
        check.problems.append(f"{name}: missing")
        return check
    if sha256_file(shard.tar) != shard.sha256:
        check.problems.append(f"{name}: sha256 differs from the manifest")
    try:
        for key, components in iter_samples(shard.tar):
            sample = check_sample(key, components, task)
            check.problems += [f"{name}: {key}: {problem}" for problem in sample.problems]
            check.keys.append(key)
            check.labels += [sample.labels] if sample.labels is not None else []
            check.groups |= {sample.group} if sample.group is not None else set()
    except (tarfile.TarError, OSError) as err:
        check.problems.append(f"{name}: unreadable tar ({err})")
        return check
    except ValueError as err:  # a sample with the same component twice
        check.problems.append(f"{name}: {err.args[0]}")
        return check
    check.num_samples = len(check.keys)
    if check.num_samples != shard.num_samples:
        check.problems.append(f"{name}: {check.num_samples} samples, the manifest says {shard.num_samples}")
    check.problems += check_index(shard)
    return check


def check_sample(key: str, components: dict[str, bytes], task: ShardTask) -> SampleCheck:
    problems = []
    if not is_sample_key(key, task.split):
        problems.append(f"key does not look like {task.split}_<8 digits>")
    if set(components) != set(COMPONENTS):
        problems.append(f"has components {sorted(components)}, expected {sorted(COMPONENTS)}")
    if "jpg" in components:
        problems += check_jpeg(components["jpg"], task.image_mode)
    if "lbl" not in components:
        return SampleCheck(problems)
    try:
        labels = task.labels.decode(components["lbl"])
    except ValueError as err:
        return SampleCheck([*problems, f".lbl: {err}"])
    if "json" not in components:
        return SampleCheck(problems, labels)
    meta_problems, group = check_json(components["json"], task.labels.names(labels))
    return SampleCheck(problems + meta_problems, labels, group)


def check_jpeg(payload: bytes, mode: str) -> list[str]:
    try:
        with Image.open(io.BytesIO(payload)) as image:
            image.load()
            found = (image.format, image.mode)
    except Exception as err:  # any decoder failure is a finding, not a crash
        return [f".jpg does not decode ({type(err).__name__}: {err})"]
    return [] if found == ("JPEG", mode) else [f".jpg is {found[0]} {found[1]}, expected JPEG {mode}"]


def check_json(payload: bytes, label_names: list[str]) -> tuple[list[str], str | None]:
    """Problems with the metadata, and the sample's group."""
    try:
        meta = load_json(payload)
    except ValueError as err:  # JSONDecodeError, DuplicateKeyError, UnicodeDecodeError
        return [f".json is not valid JSON ({err})"], None
    if not isinstance(meta, dict) or "source" not in meta:
        return [".json has no 'source'"], None
    group = None if meta.get("group") is None else str(meta["group"])
    if meta.get("labels") != label_names:
        return [f".json labels {meta.get('labels')} differ from .lbl {label_names}"], group
    return [], group


def check_index(shard: ShardInfo) -> list[str]:
    name = shard.index.name
    if not shard.index.is_file():
        return [f"{name}: missing"]
    expected = index_text(shard.tar).splitlines()
    found = shard.index.read_text().splitlines()
    for line, (want, have) in enumerate(zip(expected, found, strict=False), 1):
        if want != have:
            return [f"{name}: line {line} differs from wds2idx output ({have!r} vs {want!r})"]
    return (
        [] if len(expected) == len(found) else [f"{name}: {len(found)} lines, wds2idx gives {len(expected)}"]
    )


def check_dataset(manifest: Manifest, workers: int = 1, quiet: bool = True) -> tuple[list[str], int]:
    """All problems found, and the number of samples read."""
    labels = LabelSpace(manifest.class_names, manifest.task == "multilabel")
    tasks = [
        ShardTask(shard, split.name, labels, manifest.image_mode)
        for split in manifest.splits.values()
        for shard in split.shards
    ]
    checks = parallel_map(
        check_shard, tasks, workers, "verifying", weight=lambda task: task.shard.num_samples, quiet=quiet
    )
    problems = [problem for check in checks for problem in check.problems]
    for split in manifest.splits.values():
        mine = [check for task, check in zip(tasks, checks, strict=True) if task.split == split.name]
        problems += check_split_counts(split.name, split.num_samples, split.class_counts, mine, labels)
    problems += check_cross(manifest, tasks, checks)
    return problems, sum(check.num_samples for check in checks)


def check_split_counts(
    split: str, num_samples: int, class_counts: dict[str, int], checks: list[ShardCheck], labels: LabelSpace
) -> list[str]:
    problems = []
    found = sum(check.num_samples for check in checks)
    if found != num_samples:
        problems.append(f"split {split!r}: {found} samples, the manifest says {num_samples}")
    counts = labels.counts([label for check in checks for label in check.labels])
    if counts != class_counts:
        problems.append(f"split {split!r}: class counts {counts}, the manifest says {class_counts}")
    return problems


def check_cross(manifest: Manifest, tasks: list[ShardTask], checks: list[ShardCheck]) -> list[str]:
    """Checks across shards: unique keys, group-disjoint splits, no unlisted files, the skipped list."""
    problems = check_unique_keys(checks)
    if manifest.raw.get("split_method") in ("stratified_group", "lists+stratified_group"):
        problems += check_disjoint_groups([task.split for task in tasks], checks)
    listed = manifest.file_names
    unlisted = sorted(path.name for path in manifest.root.iterdir() if path.name not in listed)
    if unlisted:
        problems.append(f"files not listed in the manifest: {unlisted[:5]}")
    skipped = manifest.raw.get("skipped", {"count": 0, "files": []})
    if skipped["count"] != len(skipped["files"]):
        problems.append(f"skipped.count is {skipped['count']} but {len(skipped['files'])} files are listed")
    return problems


def check_unique_keys(checks: list[ShardCheck]) -> list[str]:
    counts = Counter(key for check in checks for key in check.keys)
    duplicates = sorted(key for key, count in counts.items() if count > 1)
    return [f"{len(duplicates)} duplicate sample key(s), e.g. {duplicates[:3]}"] if duplicates else []


def check_disjoint_groups(splits: list[str], checks: list[ShardCheck]) -> list[str]:
    owners: dict[str, set[str]] = {}
    for split, check in zip(splits, checks, strict=True):
        for group in check.groups:
            owners.setdefault(group, set()).add(split)
    leaked = sorted(group for group, names in owners.items() if len(names) > 1)
    return [f"{len(leaked)} group(s) appear in several splits, e.g. {leaked[:3]}"] if leaked else []


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m data_tools.verify", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path, help="a directory written by data_tools.pack")
    parser.add_argument("--workers", type=positive_int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        manifest = load_manifest(args.out_dir, check_files=False)
    except ManifestError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    problems, num_samples = check_dataset(manifest, args.workers, args.quiet)
    for problem in problems:
        print(problem)
    shards = sum(len(split.shards) for split in manifest.splits.values())
    verdict = "OK" if not problems else f"{len(problems)} problem(s)"
    print(f"{args.out_dir}: {num_samples} samples in {shards} shards: {verdict}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
