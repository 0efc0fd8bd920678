"""The DALI backend in CPU mode (``device_id=None``): batches, rank sharding, augmentation rates, bad data.

Images are designed so that each effect can be read back from the output: a flat colour per class
(label alignment), x/y ramps in the red/green channels (flips, crop area), a sharp edge (blur), a
coloured image (grayscale). Rates are checked against the configured probability with a 4.5-sigma
binomial tolerance over a few hundred views.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

from ilm_dist.config import AugConfig, ConfigError, DaliConfig, DataConfig, RunConfig, load_config
from ilm_dist.data import Placement, build_pretrain_loader, dali_shards
from ilm_dist.data.dali_backend import DaliLoader, two_view_pipeline
from ilm_dist.data.dali_shards import find_undecodable
from ilm_dist.data.manifest import ManifestError, load_manifest
from tests.dali_fixtures import Sample, image_samples, jpeg, label, write_dataset

CPU = torch.device("cpu")


def dali_loader(cfg: RunConfig, rank: int, world: int) -> DaliLoader:
    where = Placement(rank, world, CPU, cfg.seed, cfg.model.channels_last)
    return DaliLoader(cfg.data, cfg.aug, where, load_manifest(cfg.data.shards))


SIZE = 32
NO_AUG = AugConfig(crop_scale=None, color_jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, hflip=False)
COLOURS = [(220, 40, 40), (40, 220, 40), (40, 40, 220), (220, 220, 40)]


def make_cfg(shards: Path, aug: AugConfig = NO_AUG, **data) -> RunConfig:
    data = {"image_size": SIZE, "batch_size": 8, "num_workers": 2, "shuffle_buffer": 32, **data}
    return RunConfig(aug=aug, data=DataConfig(backend="dali", shards=str(shards), **data))


def pixels(view: torch.Tensor, aug: AugConfig) -> np.ndarray:
    """Undo the normalisation: ``[B, 3, S, S]`` -> ``[B, S, S, 3]`` in 0..255."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) * 255 for v in (aug.mean, aug.std))
    return (view * std + mean).permute(0, 2, 3, 1).numpy()


def all_views(cfg: RunConfig, rank: int = 0, world: int = 1, epoch: int = 0) -> tuple[np.ndarray, list]:
    """Every view of one epoch as pixels ``[2N, S, S, 3]``, and the batches."""
    batches = list(dali_loader(cfg, rank, world).epoch(epoch))
    views = [pixels(view, cfg.aug) for b in batches for view in (b.view1, b.view2)]
    return np.concatenate(views), batches


def rate_ok(hits: int, n: int, p: float) -> bool:
    return abs(hits / n - p) <= 4.5 * (p * (1 - p) / n) ** 0.5


def ramps(size: int) -> np.ndarray:
    """Red rises left to right, green top to bottom: position is readable from colour."""
    ramp = np.arange(size) * (256 // size)
    image = np.zeros((size, size, 3), np.uint8)
    image[..., 0], image[..., 1] = ramp[None, :], ramp[:, None]
    return image


def dataset(root: Path, image: np.ndarray, n: int) -> Path:
    return write_dataset(root, image_samples([image] * n, [(0,)] * n), ["a", "b"], per_shard=64)


@pytest.fixture(scope="module")
def classes(tmp_path_factory) -> Path:
    """64 samples in 4 shards; class ``i % 4`` is a flat colour, sample id = position."""
    images = [np.full((40, 48, 3), COLOURS[i % 4], np.uint8) for i in range(64)]
    return write_dataset(
        tmp_path_factory.mktemp("classes"),
        image_samples(images, [(i % 4,) for i in range(64)]),
        ["r", "g", "b", "y"],
    )


@pytest.fixture(scope="module")
def identities(tmp_path_factory) -> Path:
    """101 samples (uneven across 2 ranks and 7 shards) whose label is their own position."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (36, 36, 3), dtype=np.uint8) for _ in range(101)]
    return write_dataset(
        tmp_path_factory.mktemp("ids"),
        image_samples(images, [(i,) for i in range(101)]),
        [str(i) for i in range(101)],
    )


# ---------------------------------------------------------------------------------------------- batches


@pytest.mark.parametrize("channels_last", [False, True])
def test_batch_shape_dtype_layout_and_label_alignment(classes, channels_last):
    cfg = make_cfg(classes)
    cfg.model.channels_last = channels_last
    loader = dali_loader(cfg, 0, 1)
    assert loader.steps_per_epoch == 8
    batches = list(loader.epoch(0))
    assert len(batches) == 8
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for batch in batches:
        for view in (batch.view1, batch.view2):
            assert view.shape == (8, 3, SIZE, SIZE) and view.dtype == torch.float32
            assert view.is_contiguous(memory_format=fmt)
        assert batch.labels.shape == (8,) and batch.labels.dtype == torch.int64
        colour = pixels(batch.view1, cfg.aug).mean(axis=(1, 2))
        nearest = np.abs(colour[:, None, :] - np.array(COLOURS)[None]).sum(-1).argmin(1)
        assert nearest.tolist() == batch.labels.tolist()
        assert (batch.indices % 4).tolist() == batch.labels.tolist()
    assert sorted(i for b in batches for i in b.indices.tolist()) == list(range(64))


def test_grayscale_multilabel_shards(tmp_path):
    """1-channel JPEGs come out as 3 equal channels; multi-hot labels as ``[B, C]``."""
    patterns = [(i % 2, i // 2 % 2, i // 4 % 2) for i in range(16)]
    samples = [
        Sample(f"x{i:03d}", jpeg(np.full((40, 40), 30 + 25 * (i % 8), np.uint8)), label(*patterns[i]))
        for i in range(16)
    ]
    root = write_dataset(tmp_path, samples, ["p", "q", "r"], task="multilabel", image_mode="L")
    cfg = make_cfg(root)
    for batch in dali_loader(cfg, 0, 1).epoch(0):
        assert batch.labels.shape == (8, 3)
        image = pixels(batch.view2, cfg.aug)
        assert np.abs(image - image[..., :1]).max() < 1.5
        grey = np.rint((image.mean(axis=(1, 2, 3)) - 30) / 25).astype(int)
        assert [tuple(patterns[i]) for i in grey] == [tuple(row) for row in batch.labels.tolist()]


def test_ranks_read_disjoint_parts_and_run_equal_steps(identities):
    cfg = make_cfg(identities)
    seen = {}
    for rank in (0, 1):
        loader = dali_loader(cfg, rank, 2)
        for epoch in (0, 1):
            batches = list(loader.epoch(epoch))
            assert loader.steps_per_epoch == len(batches) == 101 // 16
            for batch in batches:
                assert batch.labels.tolist() == batch.indices.tolist()
            seen[rank, epoch] = {i for b in batches for i in b.indices.tolist()}
            assert len(seen[rank, epoch]) == 6 * 8  # no repeats within a rank
    assert not seen[0, 0] & seen[1, 0] and not seen[0, 1] & seen[1, 1]
    assert seen[0, 0] != seen[0, 1]  # the shard order changes between epochs


def test_epochs_are_seeded_resume_skips_and_views_differ(identities):
    cfg = make_cfg(identities, aug=AugConfig(), shuffle_buffer=64)
    full = list(dali_loader(cfg, 0, 1).epoch(0))
    again = list(dali_loader(cfg, 0, 1).epoch(0))
    resumed = list(dali_loader(cfg, 0, 1).epoch(0, start_step=3))
    for a, b in zip(full, again, strict=True):
        assert (
            torch.equal(a.indices, b.indices)
            and torch.equal(a.view1, b.view1)
            and torch.equal(a.view2, b.view2)
        )
    assert len(resumed) == len(full) - 3
    for a, b in zip(full[3:], resumed, strict=True):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.view1, b.view1)
    next_epoch = list(dali_loader(cfg, 0, 1).epoch(1))
    assert [b.indices.tolist() for b in next_epoch] != [b.indices.tolist() for b in full]
    for batch in full:
        assert (batch.view1 - batch.view2).abs().flatten(1).amax(1).min() > 0.1


# ------------------------------------------------------------------------------------ augmentation rates


def test_flip_rates(tmp_path):
    cfg = make_cfg(
        dataset(tmp_path, ramps(SIZE), 192), aug=replace(NO_AUG, hflip=True, vflip=True), batch_size=32
    )
    views, _ = all_views(cfg)
    red, green = views[..., 0], views[..., 1]
    hflipped = red[:, :, 0].mean(1) > red[:, :, -1].mean(1)
    vflipped = green[:, 0, :].mean(1) > green[:, -1, :].mean(1)
    assert rate_ok(hflipped.sum(), len(views), 0.5) and rate_ok(vflipped.sum(), len(views), 0.5)
    assert rate_ok((hflipped & vflipped).sum(), len(views), 0.25)  # independent draws


def test_grayscale_rate(tmp_path):
    image = ramps(SIZE)
    image[..., 2] = 90
    cfg = make_cfg(dataset(tmp_path, image, 192), aug=replace(NO_AUG, grayscale_p=0.2), batch_size=32)
    views, _ = all_views(cfg)
    grey = np.abs(views - views[..., :1]).max(axis=(1, 2, 3)) < 2
    assert rate_ok(grey.sum(), len(views), 0.2)


def test_blur_rate(tmp_path):
    image = np.zeros((64, 64, 3), np.uint8)
    image[:, 32:] = 255
    aug = replace(NO_AUG, blur_p=0.5, blur_sigma=[1.0, 2.0])  # sigma >= 1 so every blur is visible
    cfg = make_cfg(dataset(tmp_path, image, 192), aug=aug, image_size=64, batch_size=32)
    views, _ = all_views(cfg)
    blurred = ((views > 20) & (views < 235)).any(axis=(1, 2, 3))  # unblurred edges stay pure black/white
    assert rate_ok(blurred.sum(), len(views), 0.5)


def test_crop_area_range(tmp_path):
    aug = replace(NO_AUG, crop_scale=[0.25, 0.75])
    cfg = make_cfg(dataset(tmp_path, ramps(64), 160), aug=aug, batch_size=32)
    views, _ = all_views(cfg)
    extent = (views[..., :2].max(axis=(1, 2)) - views[..., :2].min(axis=(1, 2))) / 4 + 1  # crop w, h in px
    area = extent.prod(axis=1) / 64**2
    assert 0.2 < area.min() < 0.32 and 0.68 < area.max() < 0.8
    assert abs(area.mean() - 0.5) < 0.05  # uniform in [0.25, 0.75]


def test_color_jitter_rate_and_torchvision_factors(tmp_path):
    image = np.full((SIZE, SIZE, 3), 100, np.uint8)
    image[:, : SIZE // 2] = 60  # two tones, mean 80
    aug = replace(NO_AUG, color_jitter=[0.4, 0.0, 0.0, 0.0], color_jitter_p=0.5)
    cfg = make_cfg(dataset(tmp_path, image, 192), aug=aug, batch_size=32)
    views, _ = all_views(cfg)
    factor = views.mean(axis=(1, 2, 3)) / 80
    assert rate_ok((np.abs(factor - 1) > 0.01).sum(), len(views), 0.5)
    assert 0.59 < factor.min() < 0.66 and 1.34 < factor.max() < 1.41  # torchvision: [1 - 0.4, 1 + 0.4]
    cfg.aug = replace(NO_AUG, color_jitter=[0.0, 0.4, 0.0, 0.0], color_jitter_p=1.0)
    views, _ = all_views(cfg)
    spread = (views[:, :, -1] - views[:, :, 0]).mean(axis=(1, 2)) / 40
    assert np.abs(views.mean(axis=(1, 2, 3)) - 80).max() < 1.5  # contrast pivots on the mean (torchvision)
    assert 0.59 < spread.min() < 0.66 and 1.34 < spread.max() < 1.41


def test_rotation_fills_corners(tmp_path):
    cfg = make_cfg(
        dataset(tmp_path, np.full((64, 64, 3), 255, np.uint8), 64),
        aug=replace(NO_AUG, rotation=30.0),
        image_size=64,
        batch_size=32,
    )
    views, _ = all_views(cfg)
    assert (views[:, 0, 0].mean(-1) < 30).mean() > 0.85  # |angle| > ~2 degrees exposes the zero fill
    assert views[:, 32, 32].min() > 250


# -------------------------------------------------------------------------------------------- bad data


def good(i: int) -> Sample:
    return Sample(f"s{i:06d}", jpeg(np.full((36, 36, 3), 3 * i, np.uint8)), label(i % 2))


def test_missing_component_is_named_at_startup(tmp_path):
    samples = [good(i) for i in range(40)]
    samples[21] = replace(samples[21], lbl=None)
    root = write_dataset(tmp_path, samples, ["a", "b"])
    with pytest.raises(ManifestError, match=r"train-000001\.tar: sample 's000021': missing component \.lbl"):
        dali_loader(make_cfg(root), 0, 1)


@pytest.mark.parametrize("payload", [b"\xff\xd8 not a jpeg " * 20, "truncated"])
def test_corrupt_jpeg_error_names_shard_and_key(tmp_path, payload):
    samples = [good(i) for i in range(64)]
    broken = samples[37].jpg[: len(samples[37].jpg) // 3] if payload == "truncated" else payload
    samples[37] = replace(samples[37], jpg=broken)
    root = write_dataset(tmp_path, samples, ["a", "b"])
    loader = dali_loader(make_cfg(root), 0, 1)
    with pytest.raises(ManifestError, match=r"train-000002\.tar: sample 's000037': cannot decode JPEG"):
        list(loader.epoch(0))


def test_skip_bad_drops_and_counts(tmp_path):
    samples = [good(i) for i in range(68)]
    samples[3] = replace(samples[3], lbl=None)
    samples[20] = replace(samples[20], jpg=None)
    samples[33] = replace(samples[33], lbl=label(1, 0))
    samples[50] = replace(samples[50], jpg=b"\xff\xd8 not a jpeg")
    root = write_dataset(tmp_path, samples, ["a", "b"])
    cfg = make_cfg(root, dali=DaliConfig(skip_bad=True))
    seen = set()
    for rank in (0, 1):
        loader = dali_loader(cfg, rank, 2)
        assert [(b.key, b.tar.name) for b in loader.scan.bad] == [
            ("s000003", "train-000000.tar"),
            ("s000020", "train-000001.tar"),
            ("s000033", "train-000002.tar"),
            ("s000050", "train-000003.tar"),
        ]
        assert "4 bad skipped" in loader.description and loader.steps_per_epoch == 64 // 16
        seen |= {i for b in loader.epoch(0) for i in b.indices.tolist()}
    assert seen == set(range(68)) - {3, 20, 33, 50}


def test_the_decode_scan_splits_the_samples_between_ranks(tmp_path, monkeypatch):
    """Each of R ranks decodes every R-th sample; the parts together find what one process finds."""
    samples = [good(i) for i in range(37)]
    for i in (5, 6, 30):
        samples[i] = replace(samples[i], jpg=b"\xff\xd8 not a jpeg")
    samples[11] = replace(samples[11], jpg=None)  # no .jpg: left to the index check
    manifest = load_manifest(write_dataset(tmp_path, samples, ["a", "b"]))
    decoded = []
    real = dali_shards.decode_problem
    monkeypatch.setattr(dali_shards, "decode_problem", lambda data: decoded.append(data) or real(data))
    whole = find_undecodable(manifest, "train")
    assert sorted(key for _, key in whole) == ["s000005", "s000006", "s000030"]
    parts = []
    for part in range(3):
        decoded.clear()
        parts.append(find_undecodable(manifest, "train", part, 3))
        expected = [s.jpg for i, s in enumerate(samples) if i % 3 == part and s.jpg is not None]
        assert decoded == expected
    assert {k: v for found in parts for k, v in found.items()} == whole


# ------------------------------------------------------------------------------------------- wiring


def test_gpu_graph_places_decode_and_augmentations_on_the_gpu(classes):
    """Defines the GPU pipeline (no CUDA needed to define it; building it would need one)."""
    cfg = make_cfg(classes, aug=AugConfig(rotation=30.0, vflip=True))
    loader = dali_loader(cfg, 0, 1)
    pipe = two_view_pipeline(
        reader=loader._reader_args(0),
        aug=cfg.aug,
        size=SIZE,
        layout="CHW",
        hw_decoder_load=0.65,
        batch_size=8,
        num_threads=1,
        device_id=0,
        seed=1,
    )
    pipe._build_graph()  # DALI internals: graph definition only, no backend
    assert [node.device for node in pipe._graph_out] == ["gpu", "gpu", "gpu", "cpu"]


def test_factory_builds_it_and_imports_dali_lazily(classes):
    assert isinstance(
        build_pretrain_loader(
            make_cfg(classes).data, make_cfg(classes).aug, Placement(0, 1, CPU, 0), load_manifest(classes)
        ),
        DaliLoader,
    )
    code = "import sys, ilm_dist.data; sys.exit(any(m.startswith('nvidia.dali') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_dali_config_is_validated():
    base = ["data.backend=dali", "data.shards=x"]
    assert load_config(None, [*base, "data.dali.skip_bad=true"]).data.dali.skip_bad
    with pytest.raises(ConfigError, match=r"data\.dali\.hw_decoder_load"):
        load_config(None, [*base, "data.dali.hw_decoder_load=1.5"])
    with pytest.raises(ConfigError, match=r"data\.dali\.prefetch"):
        load_config(None, [*base, "data.dali.prefetch=0"])
