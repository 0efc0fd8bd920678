"""The shard format in one place: file and key names, how tar members form samples, the DALI index
(``wds2idx`` v1.2) written and parsed, component reading, and the ``.lbl`` label codec.

Its users: the packer (``data_tools.shard_writer`` / ``data_tools.writer``), both readers
(`ilm_dist.data.shard_reader` for the torch backend and evaluation, `ilm_dist.data.dali_shards` for DALI)
and the verifier (``data_tools.verify``). The manifest that lists the files is `ilm_dist.data.manifest`.

Key rule: a tar member ``<key>.<ext>`` belongs to the sample ``<key>``, where the key ends at the first
dot after the last ``/`` (``a/b.c/d.seg.png`` -> key ``a/b.c/d``, extension ``seg.png``). That is
webdataset's rule (``webdataset.tariterators.base_plus_ext``), and DALI's ``wds2idx`` and reader group
members the same way; consecutive members with the same key are one sample.
"""

from __future__ import annotations

import re
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

import numpy as np
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_iterator

from ilm_dist.data.manifest import ManifestError

INDEX_VERSION = "v1.2"  # DALI's wds2idx index format
COMPONENTS = ("jpg", "json", "lbl")  # what the packer writes per sample, in tar order
REQUIRED_COMPONENTS = ("jpg", "lbl")  # what training reads


def shard_name(split: str, shard: int) -> str:
    return f"{split}-{shard:06d}.tar"


def index_path(tar: Path) -> Path:
    """The DALI index next to a shard: ``train-000000.tar`` -> ``train-000000.idx``."""
    return tar.with_suffix(".idx")


def sample_key(split: str, index: int) -> str:
    """``{split}_{index:08d}``: the sample's position in its split."""
    return f"{split}_{index:08d}"


def is_sample_key(key: str, split: str) -> bool:
    return re.fullmatch(rf"{re.escape(split)}_\d{{8}}", key) is not None


def split_member(name: str) -> tuple[str | None, str | None]:
    """``(key, extension)`` of a tar member name by the key rule (module docstring); (None, None) when the
    name has no extension."""
    return base_plus_ext(name)


# ---------------------------------------------------------------- reading tars


def iter_samples(tar: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {extension: payload})`` per sample in tar order, grouped by webdataset's own iterators.

    Raises ``tarfile.TarError``/``OSError`` for an unreadable tar, and ValueError for a sample that has the
    same extension twice.
    """
    with open(tar, "rb") as stream:
        members = ({**member, "__url__": str(tar)} for member in tar_file_iterator(stream))
        for sample in group_by_keys(members, keys=split_member, lcase=False):
            key = sample.pop("__key__")
            sample.pop("__url__")
            yield key, sample


# ---------------------------------------------------------------- the DALI index


@dataclass(frozen=True)
class SampleRef:
    shard: int  # index into the split's shards (-1 when parsed alone)
    key: str
    components: dict[str, tuple[int, int]]  # extension -> (offset, size) in the tar


def index_lines(tar: Path) -> list[str]:
    """The sample lines ``wds2idx`` writes for ``tar``: per sample, ``<ext> <data offset> <size> <member
    name>`` for each of its components, in tar order."""
    samples: list[list[str]] = []
    last_key = None
    with tarfile.open(tar) as archive:
        for member in archive:
            if not member.isreg():
                continue
            key, ext = split_member(member.name)
            if key is None:
                continue
            entry = f"{ext} {member.offset_data} {member.size} {member.name}"
            if key == last_key:
                samples[-1].append(entry)
            else:
                samples.append([entry])
                last_key = key
    return [" ".join(sample) for sample in samples]


def format_index(lines: list[str]) -> str:
    """An index file's text: the ``v1.2 <samples>`` header, then one line per sample."""
    return "".join(f"{line}\n" for line in [f"{INDEX_VERSION} {len(lines)}", *lines])


def index_text(tar: Path) -> str:
    """What DALI's ``wds2idx`` writes for ``tar``."""
    return format_index(index_lines(tar))


def read_index(path: Path) -> tuple[list[SampleRef], list[str]]:
    """Parse one index file: its samples, and their lines as written (to write filtered copies)."""
    try:
        lines = path.read_text(encoding="ascii").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ManifestError(
            f"{path}: cannot read as a DALI wds2idx index ({err.__class__.__name__})"
        ) from None
    header = lines[0].split() if lines else []
    if len(header) != 2 or header[0] != INDEX_VERSION or not header[1].isdigit():
        raise ManifestError(
            f"{path}: not a DALI wds2idx {INDEX_VERSION} index (expected a first line '{INDEX_VERSION} <count>')"
        )
    samples = []
    for lineno, line in enumerate(lines[1:], start=2):
        fields = line.split()
        if len(fields) % 4:
            raise ManifestError(f"{path}:{lineno}: expected groups of 'ext offset size name'")
        components, key = {}, None
        for ext, offset, size, name in zip(*[iter(fields)] * 4, strict=True):
            components[ext] = (int(offset), int(size))
            key = split_member(name)[0]
        samples.append(SampleRef(-1, key or "", components))
    if len(samples) != int(header[1]):
        raise ManifestError(f"{path}: header says {header[1]} samples, found {len(samples)}")
    return samples, lines[1:]


def parse_index(path: Path) -> list[SampleRef]:
    """The samples of one ``wds2idx`` index file."""
    return read_index(path)[0]


def read_component(tar: BinaryIO, ref: SampleRef, ext: str) -> bytes:
    """One component's bytes, by its offset and size in the index (fewer bytes if the tar is truncated)."""
    offset, size = ref.components[ext]
    tar.seek(offset)
    return tar.read(size)


# ---------------------------------------------------------------- labels


@dataclass(frozen=True)
class LabelSpace:
    """The classes of a dataset and the ``.lbl`` codec: little-endian int32, the class index (one value) for
    single-label tasks, a multi-hot vector of ``len(class_names)`` for multi-label ones."""

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

    @property
    def width(self) -> int:
        """Number of int32 values in each ``.lbl``."""
        return len(self.class_names) if self.multilabel else 1

    def encode(self, labels: tuple[int, ...]) -> bytes:
        """The ``.lbl`` payload of a sample's class indices (the positives, for multi-label)."""
        if self.multilabel:
            values = np.zeros(len(self.class_names), dtype="<i4")
            values[list(labels)] = 1
        else:
            values = np.asarray(labels, dtype="<i4")
        return values.tobytes()

    def decode(self, payload: bytes) -> tuple[int, ...]:
        """Inverse of `encode`; raises ValueError when the payload does not fit this label space."""
        values = np.frombuffer(payload, dtype="<i4")
        if values.size != self.width or len(payload) != 4 * self.width:
            raise ValueError(f"expected {self.width} int32 value(s), got {len(payload)} bytes")
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


def label_vector(payload: bytes) -> np.ndarray:
    """A ``.lbl`` payload as int64 values: ``[1]`` (class index) or ``[C]`` (multi-hot)."""
    return np.frombuffer(payload, dtype="<i4").astype(np.int64)


Labels = TypeVar("Labels")  # numpy array or torch tensor


def squeeze_labels(labels: Labels) -> Labels:
    """A batch of ``.lbl`` vectors as the task uses them: ``[N, 1]`` class indices -> ``[N]``; multi-hot
    ``[N, C]`` (and already squeezed ``[N]``) unchanged. Works on numpy arrays and torch tensors."""
    return labels[:, 0] if labels.ndim == 2 and labels.shape[1] == 1 else labels


# JPEG start-of-frame markers (baseline, progressive, ...), whose segment holds the image size;
# C4 (Huffman tables), C8 (reserved) and CC (arithmetic coding) share the range but are not frames
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """``(height, width)`` from a JPEG's start-of-frame segment, without decoding; None if there is none."""
    pos = 2 if data[:2] == b"\xff\xd8" else len(data)
    while pos + 9 <= len(data) and data[pos] == 0xFF:
        marker, length = data[pos + 1], int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker in _SOF_MARKERS:
            return int.from_bytes(data[pos + 5 : pos + 7], "big"), int.from_bytes(
                data[pos + 7 : pos + 9], "big"
            )
        pos += 2 + length
    return None
