"""bench/recipe_probe.py: it reads the train and val splits only, and its val AUCs are those of a
logistic regression recomputed here on features extracted independently."""

import sys

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

import ilm_dist.data.shard_reader as shard_reader
import ilm_dist.eval.features as features
from ilm_dist.data.manifest import load_manifest
from tests.eval.support import pack_dataset
from tests.launcher import REPO

sys.path.insert(0, str(REPO / "bench"))
import recipe_probe


@pytest.fixture(scope="module")
def binary(tmp_path_factory):
    return pack_dataset(tmp_path_factory.mktemp("binary"), {"train": 60, "val": 30, "test": 20})


@pytest.fixture
def no_test_split(monkeypatch):
    """Fail on any attempt to read the test split."""
    opened = []

    class Reader(shard_reader.ShardReader):
        def __init__(self, manifest, split, *args, **kwargs):
            assert split != "test", "the recipe probe opened the test split"
            opened.append(split)
            super().__init__(manifest, split, *args, **kwargs)

    monkeypatch.setattr(recipe_probe, "ShardReader", Reader)
    monkeypatch.setattr(features, "ShardReader", Reader)
    return opened


def run(data, weights, tmp_path, *extra):
    cfg = ["--config", str(REPO / "configs" / "demo.yaml"), f"data.shards={data}", "data.image_size=32"]
    return recipe_probe.main(["--weights", weights, *cfg, "--out", str(tmp_path / "r.json"), *extra])


def test_colour_statistics_probe_matches_a_direct_fit_on_train_and_val(binary, tmp_path, no_test_split):
    result = run(binary, "colour", tmp_path, "--fractions", "1.0")
    assert set(no_test_split) == {"train", "val"} and list(result["val_auc"]) == ["f1_b1"]
    manifest = load_manifest(binary)
    xs, ys = {}, {}
    for split in ("train", "val"):
        reader = shard_reader.ShardReader(manifest, split)
        images = [
            np.asarray(reader.image(i).convert("RGB"), dtype=np.float64) / 255 for i in range(len(reader))
        ]
        xs[split] = np.array([[*im.reshape(-1, 3).mean(0), *im.reshape(-1, 3).std(0)] for im in images])
        ys[split] = np.array([int(reader.label(i).reshape(-1)[0]) for i in range(len(reader))])
    scaler = StandardScaler().fit(xs["train"])
    clf = LogisticRegression(max_iter=2000).fit(scaler.transform(xs["train"]), ys["train"])
    expected = roc_auc_score(ys["val"], clf.predict_proba(scaler.transform(xs["val"]))[:, 1])
    assert result["val_auc"]["f1_b1"]["mean"] == pytest.approx(expected, abs=1e-6)


def test_random_backbone_probe_has_every_block_fraction_and_subset(binary, tmp_path, no_test_split):
    result = run(binary, "random", tmp_path, "--fractions", "0.5", "1.0", "--subsets", "3")
    assert set(no_test_split) == {"train", "val"}
    assert list(result["val_auc"]) == [f"f{f}_b{b}" for f in ("0.5", "1") for b in (1, 2, 3, 4)]
    for key, value in result["val_auc"].items():
        assert len(value["all"]) == (3 if key.startswith("f0.5") else 1)
        assert value["mean"] == pytest.approx(np.mean(value["all"])) and 0 <= value["mean"] <= 1
    # the random backbone is seeded by the run config: the same features, hence the same AUCs
    again = run(binary, "random", tmp_path, "--fractions", "0.5", "1.0", "--subsets", "3")
    assert again["val_auc"] == result["val_auc"] and "recipe_probe.py" in again["command"]
