"""bench/eval_budget.py: it reads the train and val splits only, its val curve is the history of the
fine-tuning command's own training at the same settings, and "no longer changes" is the first check within
the tolerance of the best."""

import sys

import numpy as np
import pytest

import ilm_dist.data.shard_reader as shard_reader
from ilm_dist.config import load_config
from ilm_dist.data.manifest import load_manifest
from ilm_dist.eval.finetune import finetune
from ilm_dist.eval.fit import eval_points
from ilm_dist.eval.settings import FinetuneSettings
from tests.eval.support import pack_dataset
from tests.launcher import REPO

sys.path.insert(0, str(REPO / "bench"))
import eval_budget

DEMO = REPO / "configs" / "demo.yaml"


@pytest.fixture(scope="module")
def binary(tmp_path_factory):
    return pack_dataset(tmp_path_factory.mktemp("binary"), {"train": 60, "val": 30, "test": 20})


def overrides(data) -> list[str]:
    return [f"data.shards={data}", "data.image_size=32"]


def test_linear_curves_read_train_and_val_only_and_match_the_finetune_command(binary, tmp_path, monkeypatch):
    opened = []

    class Reader(shard_reader.ShardReader):
        def __init__(self, manifest, split, *args, **kwargs):
            assert split != "test", "the budget curves opened the test split"
            opened.append(split)
            super().__init__(manifest, split, *args, **kwargs)

    monkeypatch.setattr("ilm_dist.eval.context.ShardReader", Reader)
    monkeypatch.setattr("ilm_dist.eval.subsets.ShardReader", Reader)
    args = ["--weights", "random", "--config", str(DEMO), "--mode", "linear", "--lr", "0.01"]
    args += [
        "--fractions",
        "0.5",
        "1.0",
        "--subsets",
        "2",
        "--steps",
        "12",
        "--checks",
        "3",
        "--batch-size",
        "8",
    ]
    result = eval_budget.main([*args, "--out", str(tmp_path / "r.json"), *overrides(binary)])
    monkeypatch.undo()
    assert set(opened) == {"train", "val"}
    assert list(result["curves"]) == ["random_init/f0.5", "random_init/f1"]
    for curve in result["curves"].values():
        assert curve["steps"] == sorted(eval_points(12, 3))
        assert len(curve["per_subset"]) == (2 if curve["fraction"] < 1 else 1)
        assert curve["mean"] == pytest.approx(np.mean(curve["per_subset"], axis=0).tolist())

    # the reference: the fine-tuning command's training at the same settings, subset seed 1
    cfg = load_config(DEMO, overrides(binary))
    ctx = eval_budget.encoder_context("random", cfg, load_manifest(binary), tmp_path / "evals")
    settings = FinetuneSettings(mode="linear", epochs=1, min_steps=12, evals=3, lr=0.01, batch_size=8, seed=1)
    record = finetune(ctx, 0.5, settings)
    expected = [point["val"] for point in record["fit"]["history"]]
    assert result["curves"]["random_init/f0.5"]["per_subset"][1] == pytest.approx(expected, abs=1e-12)


def test_plateau_is_the_first_check_within_the_tolerance_of_the_best():
    steps, means = [10, 20, 30, 40], [0.60, 0.796, 0.80, 0.79]
    assert eval_budget.plateau_step(steps, means, 0.005) == 20
    assert eval_budget.plateau_step(steps, means, 0.003) == 30
    assert eval_budget.plateau_step(steps, means, 0.25) == 10


def test_probe_curves_read_train_and_val_only(binary, tmp_path, monkeypatch):
    import probe_budget
    import recipe_probe

    opened = []

    class Reader(shard_reader.ShardReader):
        def __init__(self, manifest, split, *args, **kwargs):
            assert split != "test", "the probe curves opened the test split"
            opened.append(split)
            super().__init__(manifest, split, *args, **kwargs)

    monkeypatch.setattr("ilm_dist.eval.features.ShardReader", Reader)
    args = ["--weights", "random", "--config", str(DEMO), "--fractions", "0.5", "--blocks", "1", "4"]
    result = probe_budget.main([*args, "--steps", "20", "--checks", "4", *overrides(binary)])
    monkeypatch.undo()
    assert set(opened) == {"train", "val"}
    assert list(result["curves"]) == ["random/f0.5/b1", "random/f0.5/b4"]
    manifest = load_manifest(binary)
    features = recipe_probe.block_features("random", load_config(DEMO, overrides(binary)), manifest)
    (train, labels), (val, val_labels) = features["train"], features["val"]
    for block in (1, 4):
        curve = result["curves"][f"random/f0.5/b{block}"]
        assert curve["steps"] == sorted(eval_points(20, 4)) and all(0 <= v <= 1 for v in curve["val"])
        idx = recipe_probe.stratified_subset(labels, 0.5, 0, manifest.class_names)
        reference = recipe_probe.probe_auc(train[block - 1][idx], labels[idx], val[block - 1], val_labels)
        assert curve["sklearn_val"] == pytest.approx(reference)
