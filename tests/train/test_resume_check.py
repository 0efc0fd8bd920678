"""What a resume must share with its run (ilm_dist.train.resume_check): the data by manifest digest, the
run-defining settings by leaf key."""

import hashlib

import pytest

from ilm_dist.config import load_config
from ilm_dist.data.manifest import Manifest, load_manifest
from ilm_dist.errors import InputError
from ilm_dist.train.resume_check import data_change, data_identity, refuse_changes, settings_changes
from ilm_dist.train.run_dir import RunDir
from tests.eval.support import pack_dataset


def manifest(folder, text: str) -> Manifest:
    """A Manifest as load_manifest makes it for a manifest.json holding ``text`` (only its digest matters)."""
    return Manifest(
        folder, "multiclass", ("a", "b"), "RGB", {}, {}, hashlib.sha256(text.encode()).hexdigest()
    )


def test_the_same_manifest_in_another_folder_is_the_same_data(tmp_path):
    first, moved, other = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    data = {p: load_config("configs/demo.yaml", [f"data.shards={p}"]).data for p in (first, moved, other)}
    ids = [
        data_identity(data[first], manifest(first, '{"format": "x"}')),
        data_identity(data[moved], manifest(moved, '{"format": "x"}')),
        data_identity(data[other], manifest(other, '{"format": "y"}')),
    ]
    assert ids[0]["manifest_sha256"] == hashlib.sha256(b'{"format": "x"}').hexdigest()
    assert data_change(ids[0], ids[1]) == []
    (change,) = data_change(ids[0], ids[2])
    assert (
        change
        == f"data: {first} (manifest sha256 {ids[0]['manifest_sha256'][:12]}) -> {other} (manifest sha256 {ids[2]['manifest_sha256'][:12]})"
    )
    assert data_change(None, ids[2]) == []  # a checkpoint written before identities were saved


def test_load_manifest_digests_the_manifest_file(tmp_path):
    root = pack_dataset(tmp_path, {"train": 4, "val": 2, "test": 2})
    assert load_manifest(root).sha256 == hashlib.sha256((root / "manifest.json").read_bytes()).hexdigest()


def test_without_a_manifest_the_synthetic_settings_identify_the_data():
    data = load_config("configs/demo.yaml", ["data.backend=synthetic", "data.synthetic.num_samples=64"]).data
    identity = data_identity(data, None)
    assert identity["synthetic"]["num_samples"] == 64
    other = data_identity(load_config("configs/demo.yaml", ["data.backend=synthetic"]).data, None)
    assert data_change(identity, other) and not data_change(identity, identity)


def test_run_defining_settings_are_compared_leaf_by_leaf():
    saved = load_config("configs/demo.yaml").to_dict()
    same = load_config("configs/demo.yaml", ["train.max_steps=7", "data.batch_size=4", "data.num_workers=0"])
    assert settings_changes(saved, same) == []
    changed = load_config("configs/demo.yaml", ["model.arch=resnet34", "optim.lr=0.5", "seed=3"])
    assert settings_changes(saved, changed) == [
        "seed: 0 -> 3",
        "model.arch: 'resnet18' -> 'resnet34'",
        f"optim.lr: {saved['optim']['lr']!r} -> 0.5",
    ]


def test_a_setting_added_since_the_run_started_had_its_default():
    saved = load_config("configs/demo.yaml").to_dict()
    del saved["model"]["stem"]  # a run saved before model.stem existed: the imagenet stem
    assert settings_changes(saved, load_config("configs/demo.yaml")) == []
    small = load_config("configs/demo.yaml", ["model.stem=small"])
    assert settings_changes(saved, small) == ["model.stem: 'imagenet' -> 'small'"]


def test_changes_are_refused_unless_allowed(tmp_path):
    refuse_changes(RunDir(tmp_path), [], allowed=False)
    refuse_changes(RunDir(tmp_path), ["seed: 0 -> 3"], allowed=True)
    with pytest.raises(
        InputError, match=r"--resume: this config changes what the run in .* is \(seed: 0 -> 3\)"
    ):
        refuse_changes(RunDir(tmp_path), ["seed: 0 -> 3"], allowed=False)
