"""NIH ChestX-ray14 from the files NIH distributes: Data_Entry_2017.csv, train_val_list.txt, test_list.txt."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from data_tools.labelfiles import NIH_CLASSES
from data_tools.verify import main as verify_main
from ilm_dist.data.manifest import load_manifest
from tests.data_tools.test_pack import make_tree, pack, read_dataset

# The header exactly as NIH ships it (the bracketed column names contain commas, and a trailing comma)
NIH_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],"
)


def nih_release(root: Path, patients: int = 24, seed: int = 0) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Images ``images_00k/images/<patient>_<visit>.png``, ``Data_Entry_2017.csv`` and the two split lists;
    returns ``{image name: (patient id, positive finding indices)}``."""
    rng = np.random.default_rng(seed)
    truth, rows = {}, [NIH_HEADER]
    layout = {}
    for patient in range(1, patients + 1):
        for visit in range(int(rng.integers(1, 4))):
            name = f"{patient:08d}_{visit:03d}.png"
            positives = tuple(
                sorted(rng.choice(14, size=int(rng.choice([0, 0, 1, 2])), replace=False).tolist())
            )
            labels = "|".join(NIH_CLASSES[i] for i in rng.permutation(positives)) or "No Finding"
            truth[name] = (str(patient), positives)
            rows.append(f"{name},{labels},{visit},{patient},{40 + patient},M,PA,2500,2048,0.168,0.168")
            layout.setdefault(f"images_00{1 + patient % 2}/images", []).append(name)
    for folder, names in layout.items():
        pixels = make_tree(root / "tmp", {folder: len(names)}, channels=1, mode="L")
        for (rel, _), name in zip(pixels.items(), names, strict=True):
            (root / folder).mkdir(parents=True, exist_ok=True)
            (root / "tmp" / rel).rename(root / folder / name)
    (root / "tmp").rename(root.parent / f"{root.name}-unused")
    (root / "Data_Entry_2017.csv").write_text("\n".join(rows) + "\n")
    test = [name for name, (patient, _) in truth.items() if int(patient) % 4 == 0]  # patient-disjoint
    (root / "test_list.txt").write_text("\n".join(test) + "\n")
    (root / "train_val_list.txt").write_text("\n".join(n for n in truth if n not in test) + "\n")
    return truth


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("nih") / "ChestX-ray14"
    root.mkdir()
    return root, nih_release(root)


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


def test_nih_csv_with_the_official_split_lists(
    release, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root, truth = release
    lists = [
        "--split-list",
        f"trainval={root / 'train_val_list.txt'}",
        "--split-list",
        f"test={root / 'test_list.txt'}",
    ]
    assert pack(root, tmp_path / "out", "--nih-csv", root / "Data_Entry_2017.csv", *lists) == 0
    manifest = load_manifest(tmp_path / "out")
    assert manifest.task == "multilabel" and manifest.class_names == NIH_CLASSES
    assert manifest.raw["split_method"] == "lists+stratified_group" and set(manifest.splits) == {
        "train",
        "val",
        "test",
    }
    data = read_dataset(tmp_path / "out")
    test_list = set((root / "test_list.txt").read_text().split())
    assert {s["meta"]["source"] for s in data["test"]} == test_list
    assert len(data["train"]) + len(data["val"]) == len(truth) - len(test_list)
    patients = {}
    for split, samples in data.items():
        for sample in samples:
            patient, positives = truth[sample["meta"]["source"]]
            expected = np.zeros(14, np.int32)
            expected[list(positives)] = 1  # NIH order; "No Finding" is all zeros
            assert sample["lbl"].tolist() == expected.tolist()
            assert sample["meta"]["group"] == patient
            patients.setdefault(patient, set()).add(split)
    assert all(len(splits) == 1 for splits in patients.values())  # patient-disjoint
    capsys.readouterr()
    assert verify_main([str(tmp_path / "out"), "--quiet", "--workers", "1"]) == 0, capsys.readouterr().out


def test_generic_csv_options_give_the_same_labels(release, tmp_path: Path) -> None:
    root, truth = release
    extra = ["--label-sep", "|", "--empty-label", "No Finding", "--group-col", "Patient ID"]
    assert pack(root, tmp_path / "out", *_generic_csv(root), *extra) == 0
    manifest = load_manifest(tmp_path / "out")
    found = sorted({NIH_CLASSES[i] for _, positives in truth.values() for i in positives})
    assert manifest.class_names == tuple(found) and manifest.raw["split_method"] == "stratified_group"
    for samples in read_dataset(tmp_path / "out").values():
        for sample in samples:
            positives = truth[sample["meta"]["source"]][1]
            assert sample["meta"]["labels"] == sorted((NIH_CLASSES[i] for i in positives), key=found.index)


def _generic_csv(root: Path) -> list[object]:
    """The NIH CSV's image and label columns through the generic CSV options (no --label-sep)."""
    return [
        "--labels-csv",
        root / "Data_Entry_2017.csv",
        "--image-col",
        "Image Index",
        "--label-cols",
        "Finding Labels",
    ]


def _edited_csv(root: Path, tmp: Path, line: int, cell: str) -> Path:
    rows = (root / "Data_Entry_2017.csv").read_text().splitlines()
    fields = rows[line - 1].split(",")
    fields[1] = cell
    rows[line - 1] = ",".join(fields)
    (tmp / "edited.csv").write_text("\n".join(rows) + "\n")
    return tmp / "edited.csv"


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("no-sep", ["Data_Entry_2017.csv:", "'|'-joined", "--label-sep '|'", "--nih-csv"]),
        ("no-finding-mixed", ["edited.csv:3", "'No Finding|Mass'", "alone"]),
        ("unknown-finding", ["'Covid'", "edited.csv:4", "not among the 14 NIH findings"]),
        ("unlisted", ["image(s) are in no --split-list"]),
        ("test-fraction", ["test split comes from --split-list", "0.875,0.125,0"]),
    ],
)
def test_nih_mistakes_are_refused(
    release, tmp_path: Path, capsys: pytest.CaptureFixture, case, expected
) -> None:
    root, _ = release
    before = tree_digest(root)
    lists = [
        "--split-list",
        f"trainval={root / 'train_val_list.txt'}",
        "--split-list",
        f"test={root / 'test_list.txt'}",
    ]
    csv = root / "Data_Entry_2017.csv"
    if case == "no-sep":
        argv = _generic_csv(root)
    elif case == "no-finding-mixed":
        argv = ["--nih-csv", _edited_csv(root, tmp_path, 3, "No Finding|Mass")]
    elif case == "unknown-finding":
        argv = ["--nih-csv", _edited_csv(root, tmp_path, 4, "Covid")]
    elif case == "unlisted":
        argv = ["--nih-csv", csv, *lists[2:]]
    else:
        argv = ["--nih-csv", csv, *lists, "--split-fractions", "0.8,0.1,0.1"]
    assert pack(root, tmp_path / "out", *argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    for fragment in expected:
        assert fragment in err, err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))
    assert tree_digest(root) == before
