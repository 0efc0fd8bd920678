"""data_tools.synthetic: determinism, packed output, and that classes are structural (not trivial) signal."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data_tools.synthetic import SynthSpec, main, render
from ilm_dist.data.manifest import load_manifest

NUM_CLASSES = 8


def nearest_mean_accuracy(features: np.ndarray, labels: np.ndarray) -> float:
    """Fit class means on the first half, classify the second half."""
    half = len(labels) // 2
    means = np.stack([features[:half][labels[:half] == k].mean(0) for k in range(NUM_CLASSES)])
    distances = ((features[half:, None] - means[None]) ** 2).sum(-1)
    return float((distances.argmin(1) == labels[half:]).mean())


def spectrum_histogram(images: np.ndarray, orientations: int = 8, radii: int = 8) -> np.ndarray:
    """Power spectrum summed in orientation x radial-frequency bins, normalised per image."""
    gray = images.mean(-1) if images.ndim == 4 else images
    gray = gray - gray.mean((1, 2), keepdims=True)
    power = np.abs(np.fft.fftshift(np.fft.fft2(gray), axes=(1, 2))) ** 2
    size = gray.shape[1]
    fy, fx = np.mgrid[0:size, 0:size] - size // 2
    radius = np.hypot(fx, fy) / size
    angle = np.mod(np.arctan2(fy, fx), np.pi)
    angle_bin = (angle / np.pi * orientations + 0.5).astype(int) % orientations
    radius_bin = np.minimum((radius / 0.3 * radii).astype(int), radii)
    bins = np.where(radius > 0.03, angle_bin * (radii + 1) + radius_bin, -1)
    features = np.stack([power[:, bins == b].sum(1) for b in range(orientations * (radii + 1))], 1)
    return features / features.sum(1, keepdims=True)


@pytest.fixture(scope="module")
def sample() -> tuple[np.ndarray, np.ndarray]:
    spec = SynthSpec(NUM_CLASSES, 64, False, seed=0)
    labels = np.arange(NUM_CLASSES * 40) % NUM_CLASSES
    images = np.stack([render(spec, i, int(k)) for i, k in enumerate(labels)]).astype(np.float32)
    return images, labels


def test_classes_are_not_separable_by_raw_pixel_means(sample: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = sample
    assert nearest_mean_accuracy(images.reshape(len(images), -1), labels) < 0.35  # chance is 0.125


def test_classes_are_separable_by_orientation_frequency(sample: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = sample
    assert nearest_mean_accuracy(spectrum_histogram(images), labels) > 0.85


def test_class_grid_needs_both_orientation_and_frequency() -> None:
    spec = SynthSpec(NUM_CLASSES)
    params = [spec.class_params(k) for k in range(NUM_CLASSES)]
    assert len(set(params)) == NUM_CLASSES
    assert len({theta for theta, _ in params}) < NUM_CLASSES and len({f for _, f in params}) < NUM_CLASSES
    assert len({spec.class_name(k) for k in range(NUM_CLASSES)}) == NUM_CLASSES


def test_render_is_deterministic_by_seed() -> None:
    spec = SynthSpec(4, 32, True, seed=5)
    first = render(spec, 3, 1)
    assert first.shape == (32, 32) and first.dtype == np.uint8
    assert np.array_equal(first, render(spec, 3, 1))
    assert not np.array_equal(first, render(SynthSpec(4, 32, True, seed=6), 3, 1))


@pytest.mark.parametrize("grayscale", [False, True], ids=["rgb", "gray"])
def test_packed_output(tmp_path: Path, grayscale: bool) -> None:
    argv = ["--num-classes", "3", "--per-class", "20", "--size", "24", "--shard-size", "16", "--quiet"]
    argv += ["--grayscale"] if grayscale else []
    assert main([str(tmp_path / "a"), *argv, "--workers", "1"]) == 0
    assert main([str(tmp_path / "b"), *argv, "--workers", "2"]) == 0
    manifest = load_manifest(tmp_path / "a")
    assert manifest.image_mode == ("L" if grayscale else "RGB") and manifest.task == "multiclass"
    assert manifest.raw["source"]["kind"] == "synthetic"
    assert [s.num_samples for s in manifest.splits.values()] == [48, 6, 6]
    assert set(manifest.split("val").class_counts.values()) == {2}
    shas = [json.loads((tmp_path / d / "manifest.json").read_text())["splits"] for d in "ab"]
    assert shas[0] == shas[1]
