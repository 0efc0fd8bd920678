"""Diabetic retinopathy options (issue #15): the fundus crop of the JAMA 2016 replication on fundus-like
images drawn here, and referable DR (grade >= 2) derived from 5-grade labels at pack time."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_tools.errors import BadImage
from data_tools.imaging import crop_fundus
from ilm_dist.data.manifest import load_manifest
from tests.data_tools.test_pack import make_tree, pack, read_dataset


def fundus(width: int, height: int, cx: float, cy: float, radius: float, seed: int = 0) -> np.ndarray:
    """An RGB fundus-like photograph: an orange disc with a bright optic disc and dark vessels, on a
    black background with sensor noise below the disc threshold."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] + 0.5
    r = np.hypot(x - cx, y - cy) / radius
    image = rng.integers(0, 8, (height, width, 3)).astype(np.float64)
    inside = r <= 1
    shade = 1 - 0.5 * r**2  # vignetting towards the rim
    for channel, level in enumerate((200, 90, 40)):
        image[..., channel][inside] = (level * shade)[inside] + rng.normal(0, 4, inside.sum())
    optic = np.hypot(x - (cx + 0.35 * radius), y - cy) < 0.12 * radius
    image[optic] = (250, 220, 160)
    vessel = inside & (np.abs(np.sin((x - cx) / radius * 6) * 0.3 * radius - (y - cy)) < 0.015 * radius)
    image[vessel] = (90, 20, 10)
    return np.clip(image, 0, 255).astype(np.uint8)


def disc_mask(size: int) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size] + 0.5
    return np.hypot(x - size / 2, y - size / 2) <= size / 2


@pytest.mark.parametrize(
    ("width", "height", "cx", "cy", "radius"),
    [(640, 480, 300, 240, 200), (720, 400, 380, 200, 230), (500, 500, 180, 300, 150)],
    ids=["inside", "cut-top-and-bottom", "off-centre"],
)
def test_fundus_crop_centres_the_disc_at_the_target_diameter(width, height, cx, cy, radius) -> None:
    photo = Image.fromarray(fundus(width, height, cx, cy, radius))
    cropped = crop_fundus(photo, 299)
    assert cropped.size == (299, 299) and cropped.mode == "RGB"
    disc = np.asarray(cropped.convert("L")) > 12
    expected = disc_mask(299)
    if cy - radius < 0:  # the photograph cut the disc: those rows stay black
        cut = round((radius - cy) / (2 * radius) * 299)
        expected[:cut] = expected[299 - cut :] = False
    iou = (disc & expected).sum() / (disc | expected).sum()
    assert iou > 0.97, iou
    corners = np.asarray(cropped)[[0, 0, -1, -1], [0, -1, 0, -1]]
    assert corners.max() <= 12  # black outside the disc
    optic = np.asarray(cropped)[149, round(149.5 + 0.35 * 149.5)]
    assert optic.min() > 150  # the optic disc lands where it was relative to the disc


@pytest.mark.parametrize(
    ("radius", "reason"), [(30, "0.25 of the image's shorter side"), (0, "dark everywhere")]
)
def test_no_disc_is_a_bad_image(radius: int, reason: str) -> None:
    photo = fundus(400, 300, 200, 150, radius) if radius else np.zeros((300, 400, 3), np.uint8)
    with pytest.raises(BadImage, match=reason.replace(".", r"\.")):
        crop_fundus(Image.fromarray(photo), 299)


def write_grades(root: Path, per_grade: int, extra_bad: bool = False) -> None:
    for grade in range(5):
        for i in range(per_grade):
            seed = 10 * grade + i
            photo = fundus(420, 320, 210 + i, 160, 150 + 3 * i, seed=seed)
            (root / str(grade)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(photo).save(root / str(grade) / f"{seed}_left.png")
    if extra_bad:
        Image.fromarray(fundus(420, 320, 210, 160, 20)).save(root / "0" / "tiny_disc.png")


def test_pack_referable_dr_with_fundus_crop(tmp_path: Path) -> None:
    write_grades(tmp_path / "src", per_grade=6)
    mapping = "0=non_referable,1=non_referable,2=referable,3=referable,4=referable"
    argv = ["--map-labels", mapping, "--classes", "non_referable,referable", "--fundus-crop", "299"]
    assert pack(tmp_path / "src", tmp_path / "out", *argv) == 0
    manifest = load_manifest(tmp_path / "out")
    assert manifest.task == "binary" and manifest.class_names == ("non_referable", "referable")
    assert manifest.raw["source"]["source_classes"] == ["0", "1", "2", "3", "4"]
    totals = {
        name: sum(s.class_counts[name] for s in manifest.splits.values()) for name in manifest.class_names
    }
    assert totals == {"non_referable": 12, "referable": 18}
    for samples in read_dataset(tmp_path / "out").values():
        for sample in samples:
            grade = int(sample["meta"]["source"].split("/")[0])
            assert sample["lbl"].tolist() == [int(grade >= 2)]
            assert sample["image"].shape == (299, 299, 3)
            assert (np.asarray(sample["image"]).mean(axis=2) > 12)[disc_mask(299)].mean() > 0.95


def test_ordinal_grades_keep_their_order_through_a_map(tmp_path: Path) -> None:
    write_grades(tmp_path / "src", per_grade=6)
    grades = "No_DR,Mild,Moderate,Severe,Proliferate"
    mapping = ",".join(f"{i}={name}" for i, name in enumerate(grades.split(",")))
    assert (
        pack(tmp_path / "src", tmp_path / "out", "--map-labels", mapping, "--ordinal", "--classes", grades)
        == 0
    )
    manifest = load_manifest(tmp_path / "out")
    assert manifest.task == "ordinal" and ",".join(manifest.class_names) == grades
    for sample in [s for samples in read_dataset(tmp_path / "out").values() for s in samples]:
        assert sample["lbl"].tolist() == [int(sample["meta"]["source"].split("/")[0])]


def test_disc_not_found_names_the_file_or_is_skipped(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_grades(tmp_path / "src", per_grade=6, extra_bad=True)
    assert pack(tmp_path / "src", tmp_path / "out", "--fundus-crop", "299") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'src' / '0' / 'tiny_disc.png'}: no fundus disc found")
    assert "--skip-bad" in err and not (tmp_path / "out").exists()
    assert pack(tmp_path / "src", tmp_path / "out", "--fundus-crop", "299", "--skip-bad") == 0
    assert [f["path"] for f in load_manifest(tmp_path / "out").raw["skipped"]["files"]] == ["0/tiny_disc.png"]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--map-labels", "a=x"], "no entry for the source class(es) 'b'"),
        (["--map-labels", "a=x,a=y"], "each OLD once"),
        (["--map-labels", "a=x,b=y", "--classes", "x"], "'y'"),
    ],
    ids=["unmapped", "twice", "not-in-classes"],
)
def test_label_map_mistakes(tmp_path: Path, capsys: pytest.CaptureFixture, argv, expected) -> None:
    make_tree(tmp_path / "src", {"a": 5, "b": 5})
    with pytest.raises(SystemExit) if "each OLD once" in expected else contextlib.nullcontext():
        assert pack(tmp_path / "src", tmp_path / "out", *argv) == 2
    assert expected in capsys.readouterr().err and not (tmp_path / "out").exists()
