"""Synthetic dataset with real class structure, written directly as a packed dataset.

Usage::

    python -m data_tools.synthetic OUT_DIR [--num-classes 8] [--per-class 500] [--size 64] [--grayscale]
        [--seed 0] [--split-fractions 0.8,0.1,0.1] [--shard-size 1000] [--jpeg-quality 95] [--workers N]

Class ``k`` is a family of oriented textures: Gabor patches with a class-specific orientation *and* spatial
frequency, laid out on a grid so that every orientation and every frequency is shared by several classes
(only the combination identifies the class).  Everything else is per-sample nuisance: 1-3 patches at
random positions/sizes/phases/contrasts, a weak grating of random orientation and frequency, isotropic
blobs, a smooth random background, random foreground/background colours (or gray levels) and pixel noise.
Class means of raw pixels are therefore nearly flat (a nearest-mean classifier on pixels is weak), while
an orientation x frequency histogram of the power spectrum separates the classes.

Images are rendered from ``(seed, index)`` alone, so the output is deterministic and rendering runs in the
shard-writing workers.  The manifest's ``source`` is ``{"kind": "synthetic", ...}`` with the parameters
and the orientation/frequency of every class.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from data_tools.cli import add_common_args, positive_int, run
from data_tools.errors import PackError
from data_tools.records import Record
from data_tools.shards import EncodeOptions, LabelSpace
from data_tools.splits import DEFAULT_FRACTIONS, parse_fractions, shuffled, stratified_split
from data_tools.writer import Staging, build_manifest, write_splits

MIN_FREQ, MAX_FREQ = 0.07, 0.2  # cycles per pixel of the class gratings (periods of ~14 to 5 pixels)


@dataclass(frozen=True)
class SynthSpec:
    num_classes: int = 8
    size: int = 64
    grayscale: bool = False
    seed: int = 0

    @property
    def grid(self) -> tuple[int, int]:
        """(orientations, frequencies) of the class grid."""
        freqs = max(1, round(math.sqrt(self.num_classes / 2)))
        return math.ceil(self.num_classes / freqs), freqs

    def class_params(self, label: int) -> tuple[float, float]:
        """(orientation in radians, cycles per pixel) of class ``label``."""
        orientations, freqs = self.grid
        step = (MAX_FREQ / MIN_FREQ) ** (1 / (freqs - 1)) if freqs > 1 else 1.0
        return math.pi * (label % orientations) / orientations, MIN_FREQ * step ** (label // orientations)

    def class_name(self, label: int) -> str:
        theta, freq = self.class_params(label)
        return f"theta{round(math.degrees(theta)):03d}_period{1 / freq:.1f}".replace(".", "p")


@dataclass(frozen=True)
class SyntheticRef:
    spec: SynthSpec
    index: int
    label: int

    def open(self) -> Image.Image:
        return Image.fromarray(render(self.spec, self.index, self.label))

    def describe(self) -> str:
        return f"synthetic[{self.index}]"


def render(spec: SynthSpec, index: int, label: int) -> np.ndarray:
    """uint8 [size,size] (grayscale) or [size,size,3] image ``index`` of class ``label``."""
    rng = np.random.default_rng([spec.seed, index])
    size = spec.size
    theta, freq = spec.class_params(label)
    pattern = sum(
        _gabor(rng, size, theta + rng.normal(0, math.radians(5)), freq * rng.uniform(0.9, 1.1))
        for _ in range(rng.integers(1, 4))
    )
    distractor = _gabor(rng, size, rng.uniform(0, math.pi), rng.uniform(MIN_FREQ, MAX_FREQ))
    clutter = sum(
        (2 * rng.integers(0, 2) - 1) * _blob(rng, size, rng.uniform(0.05, 0.15))
        for _ in range(rng.integers(2, 5))
    )
    background = sum(rng.uniform(-1, 1) * _blob(rng, size, rng.uniform(0.3, 0.6)) for _ in range(3))
    signal = 0.35 * pattern + 0.12 * distractor + 0.2 * clutter + 0.15 * background
    signal += rng.normal(0, rng.uniform(0.03, 0.12), signal.shape)
    level = np.clip(0.5 + signal, 0, 1)[..., None]
    low, high = _colours(rng, 1 if spec.grayscale else 3)
    image = (low + (high - low) * level) * 255
    return np.rint(image[..., 0] if spec.grayscale else image).astype(np.uint8)


def _blob(rng: np.random.Generator, size: int, relative_sigma: float) -> np.ndarray:
    """Gaussian blob at a random centre (separable: outer product of two 1-D Gaussians)."""
    coords = np.arange(size)
    cx, cy = rng.uniform(0.1 * size, 0.9 * size, 2)
    sigma = relative_sigma * size
    return np.outer(
        np.exp(-((coords - cy) ** 2) / (2 * sigma**2)), np.exp(-((coords - cx) ** 2) / (2 * sigma**2))
    )


def _gabor(rng: np.random.Generator, size: int, theta: float, freq: float) -> np.ndarray:
    """Random-phase grating of orientation ``theta`` and ``freq`` cycles/pixel under a random blob envelope."""
    envelope = _blob(rng, size, rng.uniform(0.12, 0.25))
    coords = np.arange(size)
    along_x = 2 * math.pi * freq * math.cos(theta) * coords + rng.uniform(0, 2 * math.pi)
    along_y = 2 * math.pi * freq * math.sin(theta) * coords
    wave = np.outer(np.cos(along_y), np.cos(along_x)) - np.outer(np.sin(along_y), np.sin(along_x))
    return rng.uniform(0.6, 1.0) * envelope * wave


def _colours(rng: np.random.Generator, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Random dark/bright colour pair with enough contrast between them."""
    while True:
        low, high = rng.uniform(0, 1, (2, channels))
        if np.abs(high - low).max() >= 0.4:
            return low, high


def synthetic_records(spec: SynthSpec, per_class: int) -> list[Record]:
    return [
        Record(SyntheticRef(spec, i, i % spec.num_classes), f"synthetic/{i:08d}", (i % spec.num_classes,))
        for i in range(per_class * spec.num_classes)
    ]


def generate(args: argparse.Namespace) -> dict:
    """Render and pack the dataset; returns the manifest."""
    if args.num_classes < 2:
        raise PackError("--num-classes must be at least 2")
    staging = Staging(args.out_dir, args.overwrite)
    spec = SynthSpec(args.num_classes, args.size, args.grayscale, args.seed)
    fractions = parse_fractions(args.split_fractions)
    splits = stratified_split(synthetic_records(spec, args.per_class), fractions, spec.num_classes, args.seed)
    splits = {name: shuffled(records, args.seed) for name, records in splits.items()}
    labels = LabelSpace(tuple(spec.class_name(k) for k in range(spec.num_classes)), False)
    mode = "L" if spec.grayscale else "RGB"
    source = {
        "kind": "synthetic",
        "path": None,
        "spec": spec,
        "classes": [
            {"name": labels.class_names[k], "orientation_deg": math.degrees(theta), "cycles_per_pixel": freq}
            for k, (theta, freq) in enumerate(map(spec.class_params, range(spec.num_classes)))
        ],
    }
    with staging:
        entries = write_splits(
            staging.tmp,
            splits,
            labels,
            EncodeOptions(mode, args.jpeg_quality, None),
            args.shard_size,
            args.workers,
            args.quiet,
        )
        manifest = build_manifest(
            labels=labels,
            image_mode=mode,
            split_method="stratified",
            splits=entries,
            skipped=[],
            source=source,
            args=vars(args),
        )
        staging.commit(manifest)
    return manifest


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_tools.synthetic",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--num-classes", type=positive_int, default=8)
    parser.add_argument("--per-class", type=positive_int, default=500, help="images per class (all splits)")
    parser.add_argument("--size", type=positive_int, default=64, help="image side in pixels")
    parser.add_argument("--grayscale", action="store_true", help="1-channel images (default RGB)")
    parser.add_argument("--split-fractions", default=DEFAULT_FRACTIONS, help="train,val,test fractions")
    add_common_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run(generate, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
