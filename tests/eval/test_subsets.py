"""Label subsets: stratified, seeded, every class present, multi-label aware, saved and reused."""

import json

import numpy as np
import pytest

from ilm_dist.data.manifest import load_manifest
from ilm_dist.eval.errors import EvalError
from ilm_dist.eval.subsets import load_or_draw_subset, stratified_subset, subset_path
from tests.eval.support import pack_dataset

NAMES = ("a", "b", "c")


def test_single_label_is_stratified_and_seeded():
    labels = np.repeat([0, 1, 2], [600, 300, 100])
    idx = stratified_subset(labels, 0.06, seed=1, class_names=NAMES)
    assert np.bincount(labels[idx]).tolist() == [36, 18, 6]
    assert np.array_equal(idx, stratified_subset(labels, 0.06, seed=1, class_names=NAMES))
    assert not np.array_equal(idx, stratified_subset(labels, 0.06, seed=2, class_names=NAMES))
    assert len(np.unique(idx)) == len(idx) and np.all(np.diff(idx) > 0)


def test_full_fraction_is_everything():
    labels = np.array([0, 1, 1, 2])
    assert stratified_subset(labels, 1.0, 0, NAMES).tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_fraction_out_of_range(fraction):
    with pytest.raises(EvalError, match="must be in"):
        stratified_subset(np.array([0, 1, 2]), fraction, 0, NAMES)


def test_fraction_leaving_a_class_empty_is_an_error_naming_it():
    labels = np.repeat([0, 1, 2], [900, 90, 10])
    with pytest.raises(EvalError, match=r"label fraction 0.01 leaves class 'c' empty"):
        stratified_subset(labels, 0.01, 0, NAMES)


def test_multilabel_every_finding_present_near_target():
    rng = np.random.default_rng(0)
    prevalence = np.array([0.3, 0.1, 0.02, 0.005])
    labels = (rng.random((4000, 4)) < prevalence).astype(np.int64)
    idx = stratified_subset(labels, 0.06, seed=0, class_names=tuple("wxyz"))
    picked = labels[idx].sum(axis=0)
    targets = np.floor(0.06 * labels.sum(axis=0) + 0.5)
    assert np.all(picked >= targets)  # every finding reaches its share
    assert np.all(picked <= 1.5 * targets + 2)  # and is not grossly over-represented
    assert len(idx) == round(0.06 * 4000)
    assert (labels[idx].sum(axis=1) == 0).any()  # "no finding" images are kept too


def test_multilabel_rare_finding_too_rare_for_fraction():
    labels = np.zeros((1000, 2), dtype=np.int64)
    labels[:500, 0] = 1
    labels[:20, 1] = 1
    with pytest.raises(EvalError, match="class 'y' empty"):
        stratified_subset(labels, 0.01, 0, ("x", "y"))


def test_saved_subset_is_reused_and_bound_to_its_dataset(tmp_path):
    first = load_manifest(pack_dataset(tmp_path / "a", {"train": 40, "val": 6, "test": 6}, num_classes=2))
    saved = load_or_draw_subset(tmp_path / "ev", first, "train", 0.25, seed=0)
    assert saved["num_samples"] == 10 and saved["class_counts"] == {"0": 5, "1": 5}
    assert len(saved["keys"]) == 10
    path = subset_path(tmp_path / "ev", "train", 0.25, 0)
    path.write_text(json.dumps(saved | {"marker": 1}))
    assert (
        load_or_draw_subset(tmp_path / "ev", first, "train", 0.25, seed=0)["marker"] == 1
    )  # read, not redrawn
    other = load_manifest(
        pack_dataset(tmp_path / "b", {"train": 40, "val": 6, "test": 6}, num_classes=2, seed=5)
    )
    with pytest.raises(EvalError, match="another packed dataset"):
        load_or_draw_subset(tmp_path / "ev", other, "train", 0.25, seed=0)
