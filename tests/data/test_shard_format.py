"""The one shard-format module: its key rule agrees with webdataset and DALI's wds2idx (also for member
names where the old rules disagreed), its index equals wds2idx's, the label codec round-trips."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from ilm_dist.data.shard_format import (
    LabelSpace,
    index_text,
    iter_samples,
    jpeg_size,
    parse_index,
    split_member,
    squeeze_labels,
)

VENV_BIN = Path(sys.executable).parent

# Members whose directory part holds a dot: "first dot anywhere" (the verifier's old rule) takes the key
# "dir.v1" for all of them, "first dot after the last /" (webdataset, DALI) gives two samples.
MEMBERS = [("dir.v1/s0.jpg", b"a" * 700), ("dir.v1/s0.lbl", b"\0" * 4), ("dir.v1/s1.seg.png", b"b" * 30)]


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_key_rule_is_webdatasets() -> None:
    assert split_member("dir.v1/s0.jpg") == ("dir.v1/s0", "jpg")
    assert split_member("a/b.c/d.seg.png") == ("a/b.c/d", "seg.png")
    assert split_member("train_00000001.json") == ("train_00000001", "json")
    assert split_member("README") == (None, None)


def test_samples_and_index_agree_with_webdataset_and_wds2idx(tmp_path: Path) -> None:
    tar = write_tar(tmp_path / "odd.tar", MEMBERS)
    samples = list(iter_samples(tar))
    assert [(key, sorted(parts)) for key, parts in samples] == [
        ("dir.v1/s0", ["jpg", "lbl"]),
        ("dir.v1/s1", ["seg.png"]),
    ]
    assert samples[0][1]["jpg"] == b"a" * 700
    reference = [sample["__key__"] for sample in wds.WebDataset(str(tar), shardshuffle=False)]
    assert [key for key, _ in samples] == reference
    wds2idx = tmp_path / "odd.ref.idx"
    subprocess.run([str(VENV_BIN / "wds2idx"), str(tar), str(wds2idx)], check=True, capture_output=True)
    assert index_text(tar) == wds2idx.read_text()
    (tmp_path / "odd.idx").write_text(index_text(tar))
    refs = parse_index(tmp_path / "odd.idx")
    assert [ref.key for ref in refs] == reference
    data = tar.read_bytes()
    offset, size = refs[0].components["jpg"]
    assert data[offset : offset + size] == b"a" * 700


def test_a_component_twice_is_an_error(tmp_path: Path) -> None:
    tar = write_tar(tmp_path / "dup.tar", [("s0.jpg", b"x"), ("s0.jpg", b"y")])
    with pytest.raises(ValueError, match="duplicate"):
        list(iter_samples(tar))


@pytest.mark.parametrize(("multilabel", "labels"), [(False, (2,)), (True, (0, 3)), (True, ())])
def test_label_codec_round_trips(multilabel: bool, labels: tuple[int, ...]) -> None:
    space = LabelSpace(("a", "b", "c", "d"), multilabel)
    payload = space.encode(labels)
    assert len(payload) == 4 * space.width and space.decode(payload) == labels
    expected = np.isin(np.arange(4), labels).astype("<i4") if multilabel else np.array(labels, "<i4")
    assert payload == expected.tobytes()
    with pytest.raises(ValueError):
        space.decode(payload + b"\0\0\0\0")


def test_squeeze_labels_on_numpy_and_torch() -> None:
    column = np.array([[1], [0], [2]])
    assert squeeze_labels(column).tolist() == [1, 0, 2]
    assert squeeze_labels(torch.from_numpy(column)).tolist() == [1, 0, 2]
    multi = np.array([[1, 0], [0, 1]])
    assert squeeze_labels(multi) is multi and squeeze_labels(torch.from_numpy(multi)).shape == (2, 2)
    flat = np.array([3, 1])
    assert squeeze_labels(flat) is flat


def jpeg_bytes(size: tuple[int, int], mode: str = "RGB", **save) -> bytes:
    out = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(out, "JPEG", **save)
    return out.getvalue()


@pytest.mark.parametrize(
    ("size", "mode", "save"),
    [
        ((50, 50), "RGB", {}),
        ((64, 17), "L", {}),
        ((33, 70), "RGB", {"progressive": True}),
        ((8, 9), "RGB", {"exif": b"Exif\0\0" + b"x" * 300}),
    ],
)
def test_jpeg_size_reads_the_frame_header_as_pil_does(size, mode, save):
    data = jpeg_bytes(size, mode, **save)
    assert jpeg_size(data) == (size[1], size[0]) == Image.open(io.BytesIO(data)).size[::-1]


@pytest.mark.parametrize(
    "data", [b"", b"not a jpeg", b"\xff\xd8\xff\xe0\x00\x10", b"\xff\xd8" + b"\xff\xe0\x00\x04ab" * 3]
)
def test_jpeg_size_of_something_without_a_frame_is_none(data):
    assert jpeg_size(data) is None
