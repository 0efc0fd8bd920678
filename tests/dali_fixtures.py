"""Tiny packed datasets in the ``ilm_dist.shards/v1`` layout for the DALI backend tests.

Written with ``webdataset.TarWriter`` and DALI's own ``wds2idx`` indexer, so DALI reads exactly what
``data_tools.pack`` would give it; images are chosen by each test so that the effect under test can be
measured from the output.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image
from wds2idx import IndexCreator

FORMAT = "ilm_dist.shards/v1"


@dataclass(frozen=True)
class Sample:
    key: str
    jpg: bytes | None  # None: the sample has no .jpg
    lbl: bytes | None  # None: no .lbl


def jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    """``image``: uint8 HxWx3 (RGB) or HxW (grayscale, stored 1-channel as the packer does)."""
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="JPEG", quality=quality, subsampling=0)
    return out.getvalue()


def label(*values: int) -> bytes:
    return np.asarray(values, dtype="<i4").tobytes()


def image_samples(images: list[np.ndarray], labels: list[tuple[int, ...]]) -> list[Sample]:
    return [
        Sample(f"s{i:06d}", jpeg(img), label(*lbl))
        for i, (img, lbl) in enumerate(zip(images, labels, strict=True))
    ]


def write_dataset(
    root: Path,
    samples: list[Sample],
    class_names: list[str],
    task: str = "multiclass",
    image_mode: str = "RGB",
    per_shard: int = 16,
    split: str = "train",
) -> Path:
    """Write ``samples`` as shards of ``per_shard`` samples, their indexes and ``manifest.json``; returns ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    shards = []
    for number, start in enumerate(range(0, len(samples), per_shard)):
        chunk = samples[start : start + per_shard]
        name = f"{split}-{number:06d}"
        tar, index = root / f"{name}.tar", root / f"{name}.idx"
        with wds.TarWriter(str(tar)) as writer:
            for sample in chunk:
                parts = {
                    "jpg": sample.jpg,
                    "lbl": sample.lbl,
                    "json": json.dumps({"source": sample.key}).encode(),
                }
                writer.write({"__key__": sample.key, **{k: v for k, v in parts.items() if v is not None}})
        with IndexCreator(str(tar), str(index), verbose=False) as creator:
            creator.create_index()
        digest = hashlib.sha256(tar.read_bytes()).hexdigest()
        shards.append({"name": tar.name, "index": index.name, "num_samples": len(chunk), "sha256": digest})
    manifest = {
        "format": FORMAT,
        "task": task,
        "class_names": class_names,
        "image_mode": image_mode,
        "splits": {split: {"num_samples": len(samples), "class_counts": {}, "shards": shards}},
        "skipped": {"count": 0, "files": []},
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return root
