"""Files of an evaluation directory: atomic JSON/NPZ writes and identities of datasets and subsets.

Layout (one directory per dataset, shared by every method compared on it)::

    EVAL_DIR/subsets/train_f0.01_s0.json          label subsets, drawn once, reused by every method
    EVAL_DIR/<method>/source.json                 which weights and data this method was evaluated from
    EVAL_DIR/<method>/init_features_test.npz      block features of the test split before fine-tuning
    EVAL_DIR/<method>/finetune/<mode>_f<frac>/    metrics.json, predictions.npz, features_test.npz, cka.json
    EVAL_DIR/<method>/probe/f<frac>/              features_<split>.npz, metrics.json, predictions.npz
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ilm_dist.data.manifest import Manifest
from ilm_dist.errors import ConfigError
from ilm_dist.paths import check_name
from ilm_dist.strict import load_json

SUBSETS = "subsets"  # EVAL_DIR/subsets: the label subsets, not a method


def check_method_name(name: object, key: str) -> None:
    """Raise :class:`ConfigError` naming ``key`` unless ``name`` can be the folder ``EVAL_DIR/<name>``: a
    plain name (:func:`~ilm_dist.paths.check_name`), and not :data:`SUBSETS`."""
    check_name(name, key)
    if name == SUBSETS:
        raise ConfigError(f"{key}: {name!r}: reserved, EVAL_DIR/{SUBSETS} holds the label subsets")


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # two writers of a shared file never share it
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=True) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return load_json(Path(path).read_text())


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def fraction_tag(fraction: float) -> str:
    """``0.01 -> 'f0.01'``, ``1.0 -> 'f1'``: the fraction as it appears in file names."""
    return f"f{fraction:g}"


def finetune_dir(method_dir: Path, mode: str, fraction: float) -> Path:
    """``EVAL_DIR/<method>/finetune/<mode>_f<fraction>``: one fine-tuning result."""
    return Path(method_dir) / "finetune" / f"{mode}_{fraction_tag(fraction)}"


def probe_result_dir(method_dir: Path, fraction: float) -> Path:
    """``EVAL_DIR/<method>/probe/f<fraction>``: the probes of every block at one label fraction."""
    return Path(method_dir) / "probe" / fraction_tag(fraction)


def digest(obj: Any) -> str:
    """Short SHA-256 of a JSON-serialisable value."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def arrays_digest(arrays: dict[str, np.ndarray]) -> str:
    """Short SHA-256 of named arrays (names, dtypes, shapes and values)."""
    sha = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        sha.update(f"{name} {array.dtype.str} {array.shape}".encode())
        sha.update(array.tobytes())
    return sha.hexdigest()[:16]


def dataset_id(manifest: Manifest) -> str:
    """Identity of a packed dataset: a digest of every split's shard checksums."""
    return digest({name: [s.sha256 for s in split.shards] for name, split in manifest.splits.items()})
