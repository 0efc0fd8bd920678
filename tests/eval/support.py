"""Helpers for the eval tests: tiny packed datasets written by ``data_tools.pack`` from an ``.npz``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_tools.pack import main as pack_main

COLOURS = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40]], dtype=np.int64)


def class_images(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Noisy images whose mean colour is their class's (first positive finding's for multi-hot labels)."""
    first = labels if labels.ndim == 1 else labels.argmax(axis=1)
    noise = rng.integers(-40, 40, size=(len(labels), size, size, 3))
    return np.clip(COLOURS[first][:, None, None, :] + noise, 0, 255).astype(np.uint8)


def pack_dataset(
    out: Path,
    sizes: dict[str, int],
    num_classes: int = 2,
    multilabel: bool = False,
    size: int = 32,
    seed: int = 0,
) -> Path:
    """Pack a class-structured synthetic set into ``out/packed``; returns that directory."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in sizes.items():
        if multilabel:
            labels = (rng.random((n, num_classes)) < 0.35).astype(np.int64)
            labels[np.arange(num_classes), np.arange(num_classes)] = 1  # every finding occurs
        else:
            labels = np.arange(n) % num_classes
        arrays[f"{split}_labels"] = labels
        arrays[f"{split}_images"] = class_images(labels, size, rng)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "source.npz", **arrays)
    assert pack_main([str(out / "source.npz"), str(out / "packed"), "--workers", "1", "--quiet"]) == 0
    return out / "packed"
