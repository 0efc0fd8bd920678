"""ilm_dist.eval.training_data: the training views each ``--train-aug`` gives, and the loader's batches on
a tiny packed set, each image matched back to the evaluation view of the sample it came from."""

import dataclasses

import pytest
import torch

from ilm_dist.data.augment import MocoViews
from ilm_dist.eval.errors import EvalError
from ilm_dist.eval.settings import FitSettings
from ilm_dist.eval.training_data import train_loader, training_transform
from tests.eval.random_context import random_context

SUBSET = list(range(3, 43))  # 40 of the train split, not from its start


@pytest.fixture(scope="module")
def ctx(packed_tiny, tmp_path_factory):
    return random_context(packed_tiny, tmp_path_factory.mktemp("evals"))


@pytest.fixture(scope="module")
def eval_views(ctx):
    """Each subset sample's evaluation view and label, by sample index."""
    reader, transform = ctx.reader("train"), training_transform(ctx, "none", None)
    return {i: (transform(reader.image(i)), torch.from_numpy(reader.label(i))) for i in SUBSET}


def origin(image: torch.Tensor, eval_views: dict) -> int:
    """The one subset sample whose evaluation view ``image`` is."""
    (found,) = [i for i, (view, _) in eval_views.items() if torch.equal(view, image)]
    return found


def epochs(loader, count: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    return [list(loader) for _ in range(count)]


def test_no_augmentation_batches_are_the_subset_s_eval_views_without_repeats(ctx, eval_views):
    loader = train_loader(ctx, SUBSET, FitSettings(batch_size=16, train_aug="none", seed=3))
    assert loader.batch_size == 16 and len(loader) == 40 // 16  # the remainder is dropped
    orders = []
    for batches in epochs(loader, 2):
        assert len(batches) == 2
        order = []
        for images, labels in batches:
            assert images.shape == (16, 3, 32, 32) and images.dtype == torch.float32
            for image, label in zip(images, labels, strict=True):
                order.append(origin(image, eval_views))
                assert torch.equal(label, eval_views[order[-1]][1])
        assert len(set(order)) == 32  # 32 different samples of the subset per epoch
        orders.append(order)
    assert orders[0] != orders[1]  # each epoch is a new permutation
    again = train_loader(ctx, SUBSET, FitSettings(batch_size=16, train_aug="none", seed=3))
    assert [origin(im, eval_views) for images, _ in again for im in images] == orders[0]  # seeded
    other = train_loader(ctx, SUBSET, FitSettings(batch_size=16, train_aug="none", seed=4))
    assert [origin(im, eval_views) for images, _ in other for im in images] != orders[0]


def test_the_batch_is_the_subset_when_the_subset_is_smaller(ctx, eval_views):
    loader = train_loader(ctx, SUBSET[:10], FitSettings(batch_size=64, train_aug="none"))
    assert loader.batch_size == 10 and len(loader) == 1
    ((images, _),) = list(loader)
    assert sorted(origin(im, eval_views) for im in images) == SUBSET[:10]


def test_moco_views_are_seeded_per_sample_and_epoch(ctx, eval_views):
    settings = FitSettings(batch_size=8, train_aug="moco", seed=1)
    first, second = (
        epochs(train_loader(ctx, SUBSET[:16], settings), 2),
        epochs(train_loader(ctx, SUBSET[:16], settings), 2),
    )
    for (a, la), (b, lb) in zip(first[0] + first[1], second[0] + second[1], strict=True):
        assert a.shape == (8, 3, 32, 32) and torch.equal(a, b) and torch.equal(la, lb)
    views = torch.cat([images for images, _ in first[0]])
    assert not any(torch.equal(v, eval_views[i][0]) for v in views for i in SUBSET[:16])  # augmented
    assert not torch.equal(views, torch.cat([images for images, _ in first[1]]))


def test_training_transform_per_train_aug(ctx):
    run_aug = dataclasses.replace(ctx.cfg.aug)
    moco = training_transform(ctx, "moco", None)
    assert isinstance(moco, MocoViews) and moco.aug == run_aug and moco.size == 32 and moco.views == 1
    protocol = training_transform(ctx, "protocol", {"grayscale_p": 1.0, "crop_scale": [0.2, 1.0]})
    assert isinstance(protocol, MocoViews) and protocol.views == 1
    assert protocol.aug == dataclasses.replace(run_aug, grayscale_p=1.0, crop_scale=[0.2, 1.0])
    assert ctx.cfg.aug == run_aug  # the run's aug section is not changed
    assert not isinstance(training_transform(ctx, "none", {"grayscale_p": 1.0}), MocoViews)


def test_protocol_views_without_an_aug_section_are_refused_in_one_line(ctx):
    with pytest.raises(EvalError) as err:
        training_transform(ctx, "protocol", None)
    assert str(err.value) == (
        f"--train-aug protocol: protocol {ctx.protocol.name!r} sets no training augmentations here "
        "(an 'aug' section); use --train-aug moco or none"
    )


def test_an_empty_subset_is_refused(ctx):
    with pytest.raises(EvalError, match=r"^0 labelled images cannot fill a batch on each of 1 ranks$"):
        train_loader(ctx, [], FitSettings(train_aug="none"))
