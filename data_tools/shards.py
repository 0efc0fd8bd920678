"""One shard: a deterministic WebDataset tar, its DALI index and its checksum.

Tars are written with ``webdataset.TarWriter`` with fixed mtime/uid/gid/uname/mode, so the same samples give
byte-identical shards (and the same sha256) on every run.  Components of a sample are stored in sorted
order: ``<key>.jpg``, ``<key>.json``, ``<key>.lbl``.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds

from data_tools.errors import BadImage, PackError, writing
from data_tools.imaging import render
from data_tools.records import Record

DALI_INDEX_VERSION = "v1.2"


@dataclass(frozen=True)
class LabelSpace:
    class_names: tuple[str, ...]
    multilabel: bool
    ordinal: bool = False  # single-label classes listed in their order (``--ordinal``)

    @property
    def task(self) -> str:
        """The manifest's task: ``multilabel``, ``binary`` (two classes), ``ordinal`` or ``multiclass``."""
        if self.multilabel:
            return "multilabel"
        if len(self.class_names) == 2:
            return "binary"
        return "ordinal" if self.ordinal else "multiclass"

    def encode(self, labels: tuple[int, ...]) -> bytes:
        """The ``.lbl`` payload: the class index, or a multi-hot vector, as little-endian int32."""
        if self.multilabel:
            values = np.zeros(len(self.class_names), dtype="<i4")
            values[list(labels)] = 1
        else:
            values = np.asarray(labels, dtype="<i4")
        return values.tobytes()

    def decode(self, payload: bytes) -> tuple[int, ...]:
        """Inverse of `encode`; raises ValueError when the payload does not fit this label space."""
        values = np.frombuffer(payload, dtype="<i4")
        width = len(self.class_names) if self.multilabel else 1
        if values.size != width or len(payload) != 4 * width:
            raise ValueError(f"expected {width} int32 value(s), got {len(payload)} bytes")
        if self.multilabel:
            if not np.isin(values, (0, 1)).all():
                raise ValueError(f"multi-hot values must be 0 or 1, got {values.tolist()}")
            return tuple(int(i) for i in np.flatnonzero(values))
        if not 0 <= values[0] < len(self.class_names):
            raise ValueError(f"class index {values[0]} out of range 0..{len(self.class_names) - 1}")
        return (int(values[0]),)

    def names(self, labels: tuple[int, ...]) -> list[str]:
        return [self.class_names[i] for i in labels]

    def counts(self, samples: list[tuple[int, ...]]) -> dict[str, int]:
        """Samples per class (positives per class for multi-label), every class listed."""
        counter = Counter(i for labels in samples for i in labels)
        return {name: counter[i] for i, name in enumerate(self.class_names)}


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
    index = job.tar.with_suffix(".idx")
    with writing(index), open(index, "w") as file:
        file.write(dali_index(job.tar))
    return ShardResult(
        tar=job.tar,
        index=index,
        num_samples=len(job.samples),
        sha256=sha256_file(job.tar),
        bytes=job.tar.stat().st_size,
        class_counts=job.labels.counts([record.labels for _, record in job.samples]),
    )


def dali_index(tar: Path) -> str:
    """The index DALI's ``wds2idx`` writes for ``tar``: ``v1.2 <samples>`` then one line per sample listing
    ``<ext> <data offset> <size> <member name>`` for each of its components, in tar order."""
    samples: list[list[str]] = []
    last_base = None
    with tarfile.open(tar) as archive:
        for member in archive:
            if not member.isreg():
                continue
            dot = member.name.find(".", member.name.rfind("/") + 1)
            base, ext = member.name[:dot], member.name[dot + 1 :]
            if not base or base.endswith("/"):
                continue
            entry = f"{ext} {member.offset_data} {member.size} {member.name}"
            if base == last_base:
                samples[-1].append(entry)
            else:
                samples.append([entry])
                last_base = base
    lines = [" ".join(sample) + "\n" for sample in samples]
    return f"{DALI_INDEX_VERSION} {len(samples)}\n" + "".join(lines)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
