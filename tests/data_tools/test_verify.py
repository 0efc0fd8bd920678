"""data_tools.verify: a clean dataset passes, every kind of tampering is reported."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from data_tools.pack import main as pack_main
from data_tools.synthetic_dataset import main as synthetic_main
from data_tools.verify import check_json
from data_tools.verify import main as verify_main
from tests.data_tools.test_pack import save, smooth


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("verify") / "clean"
    argv = [str(out), "--num-classes", "4", "--per-class", "10", "--size", "16", "--shard-size", "8"]
    assert synthetic_main([*argv, "--workers", "1", "--quiet"]) == 0
    return out


@pytest.fixture
def dataset(clean: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(clean, tmp_path / "data"))


def verify(out: Path, capsys: pytest.CaptureFixture) -> tuple[int, str]:
    code = verify_main([str(out), "--quiet", "--workers", "2"])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def edit_manifest(out: Path, change: Callable[[dict], None]) -> None:
    path = out / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_clean_dataset_passes(clean: Path, capsys: pytest.CaptureFixture) -> None:
    code, output = verify(clean, capsys)
    assert code == 0, output
    assert output.strip().endswith("40 samples in 6 shards: OK")


def test_corrupted_jpeg_in_shard(dataset: Path, capsys: pytest.CaptureFixture) -> None:
    index = (dataset / "train-000000.idx").read_text().splitlines()
    _, offset, _, name = index[1].split()[:4]  # first sample's .jpg
    flip_byte(dataset / "train-000000.tar", int(offset))  # breaks the JPEG start marker
    code, output = verify(dataset, capsys)
    assert code == 1
    assert "train-000000.tar: sha256 differs" in output
    assert f"train-000000.tar: {name.split('.')[0]}: .jpg" in output


def test_truncated_shard(dataset: Path, capsys: pytest.CaptureFixture) -> None:
    tar = dataset / "val-000000.tar"
    tar.write_bytes(tar.read_bytes()[:3000])
    code, output = verify(dataset, capsys)
    assert code == 1 and "val-000000.tar" in output


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            lambda m: m["splits"]["train"]["class_counts"].update({m["class_names"][0]: 99}),
            "split 'train' class_counts add up to",
        ),
        (lambda m: _bump_counts(m, "train", 0), "train-000000.tar: 8 samples, the manifest says 9"),
        (
            lambda m: m["splits"]["test"]["shards"][0].update(sha256="0" * 64),
            "test-000000.tar: sha256 differs",
        ),
        (lambda m: m["skipped"].update(count=3), "skipped.count is 3"),
    ],
    ids=["class-count", "sample-count", "sha256", "skipped"],
)
def test_tampered_manifest(dataset: Path, capsys: pytest.CaptureFixture, change, expected: str) -> None:
    edit_manifest(dataset, change)
    code, output = verify(dataset, capsys)
    assert code == 1 and expected in output, output


def _bump_counts(manifest: dict, split: str, shard: int) -> None:
    """One sample more in the manifest than in the shard, with the split's totals kept consistent."""
    manifest["splits"][split]["num_samples"] += 1
    manifest["splits"][split]["shards"][shard]["num_samples"] += 1
    manifest["splits"][split]["class_counts"][manifest["class_names"][0]] += 1


def test_inconsistent_manifest_is_an_error(dataset: Path, capsys: pytest.CaptureFixture) -> None:
    edit_manifest(dataset, lambda m: m["splits"]["train"].update(num_samples=1))
    code, output = verify(dataset, capsys)
    assert code == 1 and "do not add up" in output


def test_index_problems(dataset: Path, capsys: pytest.CaptureFixture) -> None:
    (dataset / "val-000000.idx").unlink()
    lines = (dataset / "train-000001.idx").read_text().splitlines()
    fields = lines[2].split()
    lines[2] = " ".join([fields[0], str(int(fields[1]) + 512), *fields[2:]])
    (dataset / "train-000001.idx").write_text("\n".join(lines) + "\n")
    (dataset / "stray.tar").write_bytes(b"")
    code, output = verify(dataset, capsys)
    assert code == 1
    assert "val-000000.idx: missing" in output
    assert "train-000001.idx: line 3 differs" in output
    assert "not listed in the manifest: ['stray.tar']" in output


def test_group_leak_between_splits(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Source splits may share patients; once the manifest claims group-disjoint splits, verify objects."""
    for split in ("train", "val"):
        for label in ("a", "b"):
            save(tmp_path / "src" / split / "p1" / label / f"{split}{label}.png", smooth(0))
    assert pack_main([str(tmp_path / "src"), str(tmp_path / "out"), "--group-by", "1", "--quiet"]) == 0
    assert "1 group(s) appear in several source splits" in capsys.readouterr().err
    assert verify(tmp_path / "out", capsys)[0] == 0
    edit_manifest(tmp_path / "out", lambda m: m.update(split_method="stratified_group"))
    code, output = verify(tmp_path / "out", capsys)
    assert code == 1 and "1 group(s) appear in several splits, e.g. ['p1']" in output


def test_missing_dataset(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, output = verify(tmp_path, capsys)
    assert code == 1 and "manifest.json: not found" in output


def test_a_sample_json_with_a_key_twice_is_a_finding() -> None:
    problems, _ = check_json(b'{"source": "a.png", "labels": ["x"], "labels": []}', [])
    assert problems == [".json is not valid JSON (key 'labels' given twice in one object)"]
