"""What a resume must share with its run (ilm_dist.train.resume_check): the data by manifest digest, the
run-defining settings by leaf key."""

import hashlib

import pytest

from ilm_dist.config import load_config
from ilm_dist.errors import InputError
from ilm_dist.train.resume_check import data_change, data_identity, refuse_changes, settings_changes
from ilm_dist.train.run_dir import RunDir


def packed(tmp_path, name: str, text: str = '{"format": "x"}'):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "manifest.json").write_text(text)
    return folder


def test_the_same_manifest_in_another_folder_is_the_same_data(tmp_path):
    first, moved = packed(tmp_path, "a"), packed(tmp_path, "b")
    other = packed(tmp_path, "c", '{"format": "y"}')
    ids = [
        data_identity(load_config("configs/demo.yaml", [f"data.shards={p}"])) for p in (first, moved, other)
    ]
    assert ids[0]["manifest_sha256"] == hashlib.sha256(b'{"format": "x"}').hexdigest()
    assert data_change(ids[0], ids[1]) == []
    (change,) = data_change(ids[0], ids[2])
    assert (
        change
        == f"data: {first} (manifest sha256 {ids[0]['manifest_sha256'][:12]}) -> {other} (manifest sha256 {ids[2]['manifest_sha256'][:12]})"
    )
    assert data_change(None, ids[2]) == []  # a checkpoint written before identities were saved


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


def test_changes_are_refused_unless_allowed(tmp_path):
    refuse_changes(RunDir(tmp_path), [], allowed=False)
    refuse_changes(RunDir(tmp_path), ["seed: 0 -> 3"], allowed=True)
    with pytest.raises(
        InputError, match=r"--resume: this config changes what the run in .* is \(seed: 0 -> 3\)"
    ):
        refuse_changes(RunDir(tmp_path), ["seed: 0 -> 3"], allowed=False)
