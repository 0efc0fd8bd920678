"""manifest.json may only name plain files inside the dataset folder (issue #13)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from data_tools.verify import main as verify_main
from ilm_dist.data.manifest import ManifestError, load_manifest
from ilm_dist.data.shard_reader import ShardReader
from tests.eval.support import pack_dataset


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pack_dataset(tmp_path_factory.mktemp("names"), {"train": 8, "val": 4, "test": 4})


@pytest.mark.parametrize("field", ["name", "index"])
@pytest.mark.parametrize(
    "bad", ["../../../../etc/passwd", "/etc/passwd", "sub/train-000000.tar", "..", "", "a\\\\b.tar", 7]
)
def test_foreign_names_are_refused_naming_manifest_and_name(
    packed: Path, tmp_path: Path, field: str, bad: object, capsys: pytest.CaptureFixture
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for path in packed.iterdir():
        (data / path.name).write_bytes(path.read_bytes())
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["splits"]["val"]["shards"][0][field] = bad
    (data / "manifest.json").write_text(json.dumps(manifest))
    before = tree_digest(data)
    with pytest.raises(ManifestError) as caught:
        load_manifest(data)
    message = str(caught.value)
    assert "\n" not in message
    assert str(data / "manifest.json") in message and repr(bad) in message and "plain file name" in message
    assert "root:" not in message  # nothing of /etc/passwd is echoed
    assert verify_main([str(data), "--quiet", "--workers", "1"]) == 1
    assert repr(bad) in capsys.readouterr().err
    assert tree_digest(data) == before


def test_index_that_is_not_an_index_is_named_without_echoing_it(packed: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for path in packed.iterdir():
        (data / path.name).write_bytes(path.read_bytes())
    (data / "val-000000.idx").write_text("root:x:0:0:root:/root:/bin/bash\n")
    with pytest.raises(ManifestError, match=r"not a DALI wds2idx v1\.2 index") as caught:
        ShardReader(load_manifest(data), "val")
    assert "root:x" not in str(caught.value)
    (data / "val-000000.idx").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ManifestError, match="cannot read as a DALI wds2idx index"):
        ShardReader(load_manifest(data), "val")
