"""Writing one shard: a deterministic WebDataset tar, its DALI index and its checksum (the format itself,
names, index and label codec, is `ilm_dist.data.shard_format`).

Tars are written with ``webdataset.TarWriter`` with fixed mtime/uid/gid/uname/mode, so the same samples give
byte-identical shards (and the same sha256) on every run.  Components of a sample are stored in sorted
order: ``<key>.jpg``, ``<key>.json``, ``<key>.lbl``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds

from data_tools.errors import BadImage, PackError, writing
from data_tools.imaging import render
from data_tools.records import Record
from ilm_dist.data.shard_format import LabelSpace, index_path, index_text


@dataclass(frozen=True)
class EncodeOptions:
    image_mode: str
    jpeg_quality: int
    max_side: int | None
    fundus: int | None = None  # crop to the fundus disc at this diameter (`imaging.crop_fundus`)


@dataclass(frozen=True)
class ShardJob:
    split: str
    tar: Path
    samples: tuple[tuple[str, Record], ...]
    labels: LabelSpace
    encode: EncodeOptions


@dataclass(frozen=True)
class ShardResult:
    tar: Path
    index: Path
    num_samples: int
    sha256: str
    bytes: int
    class_counts: dict[str, int]


def sample_json(record: Record, labels: LabelSpace) -> bytes:
    meta = {"source": record.source, "group": record.group, "labels": labels.names(record.labels)}
    return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()


def write_shard(job: ShardJob) -> ShardResult:
    """Encode the job's images into ``job.tar``, then write its DALI index next to it."""
    opts = job.encode
    with (
        writing(job.tar),
        open(job.tar, "wb") as stream,
        wds.TarWriter(stream, encoder=False, mtime=0, user="ilm", group="ilm") as writer,
    ):
        for key, record in job.samples:
            try:
                jpg = render(record.ref, opts.image_mode, opts.jpeg_quality, opts.max_side, opts.fundus)
            except BadImage as err:
                raise PackError(f"{record.ref.describe()}: {err.reason}") from None
            lbl = job.labels.encode(record.labels)
            writer.write({"__key__": key, "jpg": jpg, "json": sample_json(record, job.labels), "lbl": lbl})
    index = index_path(job.tar)
    with writing(index), open(index, "w") as file:
        file.write(index_text(job.tar))
    return ShardResult(
        tar=job.tar,
        index=index,
        num_samples=len(job.samples),
        sha256=sha256_file(job.tar),
        bytes=job.tar.stat().st_size,
        class_counts=job.labels.counts([record.labels for _, record in job.samples]),
    )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
