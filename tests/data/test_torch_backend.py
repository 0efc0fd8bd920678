"""The torch data backend on its own (issue #14): what the sampling and exact-resume contract of
`ilm_dist.data.batch.PretrainLoader` promises, checked directly instead of through launcher runs."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from ilm_dist.config import load_config
from ilm_dist.data.batch import Placement
from ilm_dist.data.manifest import ManifestError, load_manifest
from ilm_dist.data.shard_reader import ShardReader
from ilm_dist.data.torch_backend import TorchLoader

STEPS = 3  # batches looked at per epoch


def loader(
    shards, rank: int = 0, world: int = 1, batch: int = 8, workers: int = 0, seed: int = 0
) -> TorchLoader:
    overrides = [
        f"data.shards={shards}",
        "data.image_size=32",
        f"data.batch_size={batch}",
        f"data.num_workers={workers}",
        f"seed={seed}",
    ]
    cfg = load_config(None, overrides)
    where = Placement(rank, world, torch.device("cpu"), cfg.seed)
    return TorchLoader(cfg.data, cfg.aug, where, load_manifest(shards))


def first(loader_: TorchLoader, epoch: int = 0, start_step: int = 0, steps: int = STEPS) -> list:
    return list(itertools.islice(loader_.epoch(epoch, start_step), steps))


def test_batches_hold_two_views_and_the_labels_of_their_samples(packed_tiny) -> None:
    one = loader(packed_tiny)
    reader = ShardReader(load_manifest(packed_tiny), "train")
    assert one.steps_per_epoch == len(reader) // 8
    for batch in first(one):
        assert batch.view1.shape == batch.view2.shape == (8, 3, 32, 32) and batch.view1.dtype == torch.float32
        assert not torch.equal(batch.view1, batch.view2)  # independent augmentations
        assert batch.labels.shape == (8,) and batch.labels.dtype == torch.int64
        expected = [int(reader.label(int(i))[0]) for i in batch.indices]
        assert batch.labels.tolist() == expected


def test_r_ranks_see_the_global_batches_of_one_rank(packed_tiny) -> None:
    whole = first(loader(packed_tiny, batch=8))
    parts = [first(loader(packed_tiny, rank=r, world=2, batch=4)) for r in range(2)]
    assert (
        loader(packed_tiny, rank=1, world=2, batch=4).steps_per_epoch == loader(packed_tiny).steps_per_epoch
    )
    for step, batch in enumerate(whole):
        for r in range(2):
            part = parts[r][step]
            assert torch.equal(part.indices, batch.indices[4 * r : 4 * r + 4])
            assert torch.equal(part.view1, batch.view1[4 * r : 4 * r + 4])
            assert torch.equal(part.view2, batch.view2[4 * r : 4 * r + 4])


def test_views_do_not_depend_on_the_worker_count(packed_tiny) -> None:
    for a, b in zip(first(loader(packed_tiny)), first(loader(packed_tiny, workers=2)), strict=True):
        assert (
            torch.equal(a.indices, b.indices)
            and torch.equal(a.view1, b.view1)
            and torch.equal(a.view2, b.view2)
        )


def test_resume_is_slicing_and_epochs_and_seeds_differ(packed_tiny) -> None:
    one = loader(packed_tiny)
    full = first(one, epoch=1, steps=STEPS + 2)
    resumed = first(one, epoch=1, start_step=2)
    for a, b in zip(full[2:], resumed, strict=True):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.view1, b.view1)
    other_epoch = first(one, epoch=2, steps=1)[0]
    other_seed = first(loader(packed_tiny, seed=1), epoch=1, steps=1)[0]
    assert not torch.equal(other_epoch.indices, full[0].indices)
    assert not torch.equal(other_seed.indices, full[0].indices)
    assert len(list(one.epoch(0, start_step=one.steps_per_epoch))) == 0


def test_an_epoch_visits_each_sample_at_most_once(packed_tiny) -> None:
    one = loader(packed_tiny, batch=16)
    seen = np.concatenate([batch.indices.numpy() for batch in one.epoch(0)])
    assert len(seen) == one.steps_per_epoch * 16 and len(np.unique(seen)) == len(seen)


def test_reader_pixels_are_the_decoded_image(packed_tiny, monkeypatch) -> None:
    """libjpeg-turbo's pixels (the training path) equal PIL's image (evaluation), and an image above PIL's
    decompression-bomb limit is refused by both, naming the sample."""
    reader = ShardReader(load_manifest(packed_tiny), "train")
    for i in (0, 5, len(reader) - 1):
        assert torch.equal(reader.pixels(i), torch.from_numpy(np.array(reader.image(i))))
    monkeypatch.setattr("PIL.Image.MAX_IMAGE_PIXELS", 32 * 32 // 2 - 1)
    for read in (reader.pixels, reader.image):
        with pytest.raises(ManifestError, match=r"train-000000\.tar: sample '[^']+': .*decompression"):
            read(0)
