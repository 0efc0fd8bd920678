"""What the packer moves around: one `Record` per sample, pointing at its pixels through an image ref.

Records and refs are small frozen dataclasses so they pickle cheaply to worker processes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

SPLITS = ("train", "val", "test")


class ImageRef(Protocol):
    def open(self) -> Image.Image:
        """Return the image (lazily loaded is fine; callers force decoding)."""
        ...

    def describe(self) -> str:
        """Where the pixels live, for error messages."""
        ...


@dataclass(frozen=True)
class FileRef:
    path: Path

    def open(self) -> Image.Image:
        return Image.open(self.path)

    def describe(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class ArrayRef:
    """Image ``index`` of array ``key`` in an ``.npz`` file."""

    path: Path
    key: str
    index: int

    def open(self) -> Image.Image:
        return Image.fromarray(npz_array(self.path, self.key)[self.index])

    def describe(self) -> str:
        return f"{self.path}:{self.key}[{self.index}]"


@lru_cache(maxsize=16)
def npz_array(path: Path, key: str) -> np.ndarray:
    """Load (once per process) one array of an ``.npz``; forked workers inherit the parent's cache."""
    with np.load(path, allow_pickle=False) as npz:
        return npz[key]


@dataclass(frozen=True)
class Record:
    """One sample: ``labels`` are class indices (one for single-label tasks, the positives for multi-label),
    ``source`` its path relative to the source root (written to the sample's ``.json``)."""

    ref: ImageRef
    source: str
    labels: tuple[int, ...]
    group: str | None = None
    split: str | None = None


def natural_key(text: str) -> tuple:
    """Sort key that orders ``class2`` before ``class10``."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text))
