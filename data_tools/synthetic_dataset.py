"""Synthetic dataset with real class structure, written directly as a packed dataset.

Usage::

    python -m data_tools.synthetic_dataset OUT_DIR [--num-classes 8] [--per-class 500] [--size 64] [--grayscale]
        [--seed 0] [--split-fractions 0.8,0.1,0.1] [--shard-size 1000] [--jpeg-quality 95] [--workers N]

Class ``k`` is a silhouette (disk, ring, square, frame, triangle, plus, cross, two dots; up to 8 classes).
Everything else is per-sample nuisance: the shape's position and size, a random dark background colour, a
random brighter foreground colour (gray levels with ``--grayscale``) and pixel noise. The colours dominate
the raw pixels and the pooled features of a randomly initialised ResNet, so a nearest-mean classifier on
pixels or a kNN probe of a random encoder sit near chance; the silhouette survives MoCo's crops, and its
colour jitter and grayscale augmentations (Chen et al. 2020) take the colours away, so a few minutes of
contrastive pretraining make the class readable (the demo in ``configs/demo.yaml``).

Images are rendered from ``(seed, index)`` alone, so the output is deterministic and rendering runs in the
shard-writing workers. The manifest's ``source`` is ``{"kind": "synthetic", ...}`` with the parameters.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from data_tools.command import add_common_args, positive_int, run
from data_tools.errors import PackError
from data_tools.records import Record
from data_tools.shard_writer import EncodeOptions
from data_tools.splits import DEFAULT_FRACTIONS, parse_fractions, shuffled, stratified_split
from data_tools.writer import Staging, build_manifest, write_splits
from ilm_dist.data.shard_format import LabelSpace
from ilm_dist.errors import ArgumentParser

SHAPES = ("disk", "ring", "square", "frame", "triangle", "plus", "cross", "two_dots")
RADIUS = (0.28, 0.36)  # shape half-extent, fraction of the image side
OFFSET = 0.12  # largest shift of the shape centre from the image centre, fraction of the side
MIN_CONTRAST = 0.3  # foreground minus background mean intensity, on [0, 1]
NOISE = 0.04  # pixel noise standard deviation, on [0, 1]


@dataclass(frozen=True)
class SynthSpec:
    num_classes: int = 8
    size: int = 64
    grayscale: bool = False
    seed: int = 0

    def class_name(self, label: int) -> str:
        return SHAPES[label]


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
    radius = rng.uniform(*RADIUS) * size
    cx, cy = size / 2 + rng.uniform(-OFFSET, OFFSET, 2) * size
    mask = silhouette(SHAPES[label], size, cx, cy, radius)
    background, foreground = _colours(rng, 1 if spec.grayscale else 3)
    image = np.where(mask[..., None], foreground, background) + rng.normal(
        0, NOISE, (size, size, 1 if spec.grayscale else 3)
    )
    image = np.rint(np.clip(image, 0, 1) * 255).astype(np.uint8)
    return image[..., 0] if spec.grayscale else image


def silhouette(shape: str, size: int, cx: float, cy: float, radius: float) -> np.ndarray:
    """Boolean [size,size] mask of ``shape`` centred at (cx, cy) with half-extent ``radius`` (pixels)."""
    y, x = np.mgrid[0:size, 0:size] + 0.5
    dx, dy = (x - cx) / radius, (y - cy) / radius
    ax, ay, r2 = np.abs(dx), np.abs(dy), dx**2 + dy**2
    box = (ax <= 0.8) & (ay <= 0.8)
    masks = {
        "disk": lambda: r2 <= 1,
        "ring": lambda: (r2 <= 1) & (r2 >= 0.45),
        "square": lambda: box,
        "frame": lambda: (ax <= 0.85) & (ay <= 0.85) & ~((ax <= 0.5) & (ay <= 0.5)),
        "triangle": lambda: (dy >= -0.9) & (dy <= 0.8) & (ax <= 0.56 * (dy + 0.9)),
        "plus": lambda: ((ax <= 0.28) & (ay <= 0.95)) | ((ay <= 0.28) & (ax <= 0.95)),
        "cross": lambda: box & ((np.abs(dx - dy) <= 0.35) | (np.abs(dx + dy) <= 0.35)),
        "two_dots": lambda: ((dx - 0.5) ** 2 + dy**2 <= 0.2) | ((dx + 0.5) ** 2 + dy**2 <= 0.2),
    }
    return masks[shape]()


def _colours(rng: np.random.Generator, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Random (background, foreground) colours, the foreground brighter by at least ``MIN_CONTRAST``."""
    while True:
        background, foreground = rng.uniform(0, 1, (2, channels))
        if foreground.mean() - background.mean() >= MIN_CONTRAST:
            return background, foreground


def synthetic_records(spec: SynthSpec, per_class: int) -> list[Record]:
    return [
        Record(SyntheticRef(spec, i, i % spec.num_classes), f"synthetic/{i:08d}", (i % spec.num_classes,))
        for i in range(per_class * spec.num_classes)
    ]


def generate(args: argparse.Namespace) -> dict:
    """Render and pack the dataset; returns the manifest."""
    if not 2 <= args.num_classes <= len(SHAPES):
        raise PackError(
            f"--num-classes must be between 2 and {len(SHAPES)} (one shape per class: {', '.join(SHAPES)})"
        )
    with Staging(args.out_dir, args.overwrite) as staging:
        return _generate_into(staging, args)


def _generate_into(staging: Staging, args: argparse.Namespace) -> dict:
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
        "radius": RADIUS,
        "offset": OFFSET,
        "min_contrast": MIN_CONTRAST,
        "noise": NOISE,
    }
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
    parser = ArgumentParser(
        prog="python -m data_tools.synthetic_dataset",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--num-classes", type=positive_int, default=8, help=f"2 to {len(SHAPES)}")
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
