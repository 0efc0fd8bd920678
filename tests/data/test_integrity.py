"""A pretraining run reads what manifest.json promises, or stops naming the shard (ilm_dist/data/integrity.py and
the manifest's own checks): bytes changed in place, a shard replaced by a copy of another, a truncated shard,
class counts that do not add up."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ilm_dist.data.integrity import check_split_content
from ilm_dist.data.manifest import ManifestError, load_manifest
from tests.launcher import REPO, cpu_env


@pytest.fixture
def data(packed_tiny, tmp_path) -> Path:
    return Path(shutil.copytree(packed_tiny, tmp_path / "data"))


def flip_a_byte(path: Path) -> None:
    """Change one byte in the middle of ``path``, keeping its size."""
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def edit_manifest(root: Path, change) -> None:
    manifest = json.loads((root / "manifest.json").read_text())
    change(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_a_clean_split_passes(data):
    check_split_content(load_manifest(data), "train", hash_shards=True)


def test_bytes_changed_in_place_are_named_by_shard(data):
    flip_a_byte(data / "train-000001.tar")
    check_split_content(
        load_manifest(data), "train", hash_shards=False
    )  # same size, same keys: only the hash
    with pytest.raises(
        ManifestError, match=r"train-000001\.tar: sha256 \w+\.\.\. differs from manifest\.json's"
    ):
        check_split_content(load_manifest(data), "train", hash_shards=True)


def test_a_shard_replaced_by_a_copy_of_another_repeats_its_keys(data):
    """Shards of 64 samples are padded to the same size: only the keys (or the hashes) tell the copy apart."""
    shutil.copy(data / "train-000000.tar", data / "train-000001.tar")
    shutil.copy(data / "train-000000.idx", data / "train-000001.idx")
    with pytest.raises(
        ManifestError, match=r"split 'train' holds 64 sample key\(s\) more than once, e\.g\. "
    ):
        check_split_content(load_manifest(data), "train", hash_shards=False)


def test_a_truncated_shard_is_named_before_any_read(data):
    tar = data / "train-000002.tar"
    tar.write_bytes(tar.read_bytes()[:5000])
    with pytest.raises(
        ManifestError, match=r"train-000002\.tar: 5000 bytes, manifest\.json says \d+ \(truncated"
    ):
        load_manifest(data)


def test_files_listed_twice_and_counts_that_do_not_add_up_are_refused(data):
    shutil.copy(data / "manifest.json", data / "manifest.json.orig")

    def list_a_train_shard_in_val(manifest: dict) -> None:
        shard = dict(manifest["splits"]["train"]["shards"][0])
        manifest["splits"]["val"]["shards"].append(shard)
        manifest["splits"]["val"]["num_samples"] += shard["num_samples"]
        manifest["splits"]["val"]["class_counts"] = {}

    edit_manifest(data, list_a_train_shard_in_val)
    with pytest.raises(
        ManifestError, match=r"train-000000\.tar is listed twice \(split 'train' and split 'val'\)"
    ):
        load_manifest(data)
    shutil.copy(data / "manifest.json.orig", data / "manifest.json")
    edit_manifest(data, lambda m: m["splits"]["train"]["class_counts"].update({m["class_names"][0]: 0}))
    with pytest.raises(
        ManifestError, match=r"split 'train' class_counts add up to \d+, but num_samples is \d+"
    ):
        load_manifest(data)


@pytest.mark.slow
def test_pretraining_on_a_changed_shard_stops_naming_it(data, tmp_path):
    flip_a_byte(data / "train-000000.tar")
    cmd = [
        sys.executable,
        "launch/pretrain.py",
        "--config",
        "configs/demo.yaml",
        "data.backend=torch",
        f"data.shards={data}",
        "data.image_size=32",
        "data.batch_size=8",
        "data.num_workers=0",
        "train.max_steps=2",
        f"output_dir={tmp_path / 'run'}",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "train-000000.tar: sha256" in errors[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()
