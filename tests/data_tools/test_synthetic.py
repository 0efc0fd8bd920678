"""data_tools.synthetic_dataset: determinism, packed output, and that the class is the silhouette, not the colours."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data_tools.synthetic_dataset import SHAPES, SynthSpec, main, render
from ilm_dist.data.manifest import load_manifest

NUM_CLASSES = 8


def nearest_mean_accuracy(features: np.ndarray, labels: np.ndarray) -> float:
    """Fit class means on the first half, classify the second half."""
    half = len(labels) // 2
    means = np.stack([features[:half][labels[:half] == k].mean(0) for k in range(NUM_CLASSES)])
    distances = ((features[half:, None] - means[None]) ** 2).sum(-1)
    return float((distances.argmin(1) == labels[half:]).mean())


def centred_silhouettes(images: np.ndarray) -> np.ndarray:
    """Each image thresholded halfway between its darkest and brightest gray level, shifted to its centroid."""
    gray = images.mean(-1)
    low, high = gray.min((1, 2), keepdims=True), gray.max((1, 2), keepdims=True)
    masks = (gray > (low + high) / 2).astype(np.float32)
    centre = np.array(masks.shape[1:]) // 2
    centred = []
    for mask in masks:
        shift = np.rint(centre - np.argwhere(mask).mean(0)).astype(int)
        centred.append(np.roll(mask, tuple(shift), axis=(0, 1)))
    return np.stack(centred).reshape(len(masks), -1)


@pytest.fixture(scope="module")
def sample() -> tuple[np.ndarray, np.ndarray]:
    spec = SynthSpec(NUM_CLASSES, 64, False, seed=0)
    labels = np.arange(NUM_CLASSES * 40) % NUM_CLASSES
    images = np.stack([render(spec, i, int(k)) for i, k in enumerate(labels)]).astype(np.float32)
    return images, labels


def test_classes_are_not_separable_by_raw_pixel_means(sample: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = sample
    assert nearest_mean_accuracy(images.reshape(len(images), -1), labels) < 0.35  # chance is 0.125


def test_classes_are_separable_by_silhouette(sample: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = sample
    assert nearest_mean_accuracy(centred_silhouettes(images), labels) > 0.85


def test_class_names_are_the_shapes() -> None:
    spec = SynthSpec(NUM_CLASSES)
    assert [spec.class_name(k) for k in range(NUM_CLASSES)] == list(SHAPES)


def test_more_classes_than_shapes_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([str(tmp_path / "out"), "--num-classes", str(len(SHAPES) + 1), "--quiet"]) != 0
    assert "--num-classes must be between 2 and 8" in capsys.readouterr().err
    assert not (tmp_path / "out" / "manifest.json").exists()


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
