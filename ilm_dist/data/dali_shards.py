"""What the DALI backend checks and knows about a split's shards before DALI runs.

DALI's webdataset reader and decoders report bad data without naming the shard or the sample (a
missing ``.lbl`` or an undecodable JPEG stops the pipeline with an nvImageCodec status code). So the
index files are checked here at start-up, and this module provides what is needed to name a sample
afterwards: the map from DALI's ``source_info`` (``<tar>:<offset>:<name>``) to the sample's position in
the split, and a decode check for the samples a failed pipeline had in flight.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ilm_dist.data.manifest import Manifest, ManifestError, ShardInfo
from ilm_dist.data.shard_format import (
    REQUIRED_COMPONENTS,
    SampleRef,
    format_index,
    read_component,
    read_index,
)


@dataclass(frozen=True)
class BadSample:
    tar: Path
    key: str
    reason: str

    def __str__(self) -> str:
        return f"{self.tar}: sample {self.key!r}: {self.reason}"


@dataclass
class SplitScan:
    """The usable samples of one split, shard by shard, and the ones that are not."""

    tars: list[Path]  # shards with at least one usable sample, in manifest order
    indexes: list[Path]  # their index files as packed
    index_lines: list[list[str]]  # per shard in ``tars``: the index line of each usable sample
    positions: dict[str, int]  # "<tar>:<jpg offset>" (DALI's source_info prefix) -> index in the split
    bad: list[BadSample]

    @property
    def num_samples(self) -> int:
        return len(self.positions)

    def position(self, source_info: str) -> int:
        """The split index of the sample DALI describes as ``<tar>:<offset>:<name>``."""
        return self.positions[source_info.rsplit(":", 1)[0]]


def scan_split(
    manifest: Manifest, split: str, undecodable: Mapping[tuple[str, str], str] | None = None
) -> SplitScan:
    """Parse every index of ``split``; each sample must have a ``.jpg`` and a ``.lbl`` of the manifest's width.

    ``undecodable``: ``(tar, key) -> reason`` of the samples whose JPEG was found undecodable
    (:func:`find_undecodable`, the start-up scan behind ``data.dali.skip_bad``); they count as bad too.
    """
    undecodable = undecodable or {}
    scan = SplitScan([], [], [], {}, [])
    position = 0
    for shard, refs, lines in _shard_indexes(manifest, split):
        kept = []
        for ref, line in zip(refs, lines, strict=True):
            reason = component_problem(ref, manifest.label_width) or undecodable.get(
                (str(shard.tar), ref.key)
            )
            if reason is None:
                scan.positions[f"{shard.tar}:{ref.components['jpg'][0]}"] = position
                kept.append(line)
            else:
                scan.bad.append(BadSample(shard.tar, ref.key, reason))
            position += 1
        if kept:
            scan.tars.append(shard.tar)
            scan.indexes.append(shard.index)
            scan.index_lines.append(kept)
    return scan


def find_undecodable(
    manifest: Manifest, split: str, part: int = 0, parts: int = 1
) -> dict[tuple[str, str], str]:
    """``(tar, key) -> reason`` for the JPEGs of ``split`` that do not decode, among every ``parts``-th sample
    from ``part`` on (so ``parts`` processes share the work). Each JPEG is decoded at 1/8 scale, which still
    reads its whole entropy-coded stream; samples without a ``.jpg`` are left to :func:`scan_split`."""
    found = {}
    position = 0
    for shard, refs, _ in _shard_indexes(manifest, split):
        with open(shard.tar, "rb") as tar:
            for ref in refs:
                if position % parts == part and "jpg" in ref.components:
                    reason = decode_problem(read_component(tar, ref, "jpg"))
                    if reason is not None:
                        found[str(shard.tar), ref.key] = reason
                position += 1
    return found


def _shard_indexes(manifest: Manifest, split: str) -> Iterator[tuple[ShardInfo, list[SampleRef], list[str]]]:
    """Each shard of ``split`` with its index's samples and lines, checked against the manifest's count."""
    for shard in manifest.split(split).shards:
        refs, lines = read_index(shard.index)
        if len(refs) != shard.num_samples:
            raise ManifestError(f"{shard.index}: {len(refs)} samples, manifest.json says {shard.num_samples}")
        yield shard, refs, lines


def component_problem(ref: SampleRef, label_width: int) -> str | None:
    missing = [f".{ext}" for ext in REQUIRED_COMPONENTS if ext not in ref.components]
    if missing:
        return f"missing component {', '.join(missing)}"
    size = ref.components["lbl"][1]
    if size != 4 * label_width:
        return f".lbl has {size} bytes, expected {label_width} int32 value(s)"
    return None


def decode_problem(data: bytes) -> str | None:
    """Why ``data`` is not a decodable image, or None; decodes at reduced scale for speed."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
    except UnidentifiedImageError:  # its message names the in-memory buffer's address
        return "cannot decode JPEG (not an image format PIL recognises)"
    except (OSError, SyntaxError, ValueError) as err:
        return f"cannot decode JPEG ({err})"
    return None


def write_indexes(scan: SplitScan, directory: Path) -> list[Path]:
    """Index files listing only the usable samples, for DALI's reader (one per shard in ``scan.tars``)."""
    paths = []
    for tar, lines in zip(scan.tars, scan.index_lines, strict=True):
        path = directory / f"{tar.stem}.idx"
        path.write_text(format_index(lines))
        paths.append(path)
    return paths
