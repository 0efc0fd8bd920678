"""data_tools.pack: sources, splits, image handling, determinism, DALI index, bad input."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_tools.errors import PackError
from data_tools.labelfiles import NIH_CLASSES
from data_tools.pack import main as pack_main
from data_tools.records import Record
from data_tools.splits import parse_fractions, stratified_split
from ilm_dist.data.manifest import load_manifest
from ilm_dist.data.shard_format import iter_samples

VENV_BIN = Path(sys.executable).parent


# ---------------------------------------------------------------- helpers


def smooth(seed: int, size: tuple[int, int] = (24, 20), channels: int = 3) -> np.ndarray:
    """A smooth random uint8 image (JPEG-friendly), [h,w] or [h,w,c]."""
    rng = np.random.default_rng(seed)
    height, width = size
    y, x = np.mgrid[0:height, 0:width] / max(size)
    planes = [
        128 + 90 * np.sin(rng.uniform(1, 4) * x + rng.uniform(0, 6)) * np.cos(rng.uniform(1, 4) * y)
        for _ in range(channels)
    ]
    pixels = np.stack(planes, -1) if channels > 1 else planes[0]
    return np.clip(pixels, 0, 255).astype(np.uint8)


def save(path: Path, pixels: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(pixels)
    (image.convert(mode) if mode else image).save(path)


def make_tree(
    root: Path, layout: dict[str, int], channels: int = 3, mode: str | None = None
) -> dict[str, np.ndarray]:
    """``{folder: count}`` → PNGs ``folder/<folder>_<i>.png``; returns ``{relative path: pixels}``."""
    pixels = {}
    for folder, count in layout.items():
        for i in range(count):
            rel = f"{folder}/{folder.replace('/', '_')}_{i}.png"
            pixels[rel] = smooth(len(pixels), channels=channels)
            save(root / rel, pixels[rel], mode)
    return pixels


def pack(*argv: object) -> int:
    return pack_main(["--quiet", "--workers", "1", *map(str, argv)])


def read_dataset(out: Path) -> dict[str, list[dict]]:
    """Every sample per split: ``{"key", "image" (array), "lbl" (int32 array), "meta"}``."""
    manifest = load_manifest(out)
    result = {}
    for name, split in manifest.splits.items():
        result[name] = []
        for shard in split.shards:
            for key, parts in iter_samples(shard.tar):
                image = np.asarray(Image.open(io.BytesIO(parts["jpg"])))
                lbl = np.frombuffer(parts["lbl"], "<i4")
                result[name].append(
                    {"key": key, "image": image, "lbl": lbl, "meta": json.loads(parts["json"])}
                )
    return result


def manifest_of(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


# ---------------------------------------------------------------- folder trees, images


def test_folder_roundtrip(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", {"cat": 12, "dog": 9, "eel": 7})
    out = tmp_path / "out"
    assert pack(tmp_path / "src", out, "--shard-size", "7", "--workers", "2") == 0
    manifest = load_manifest(out)
    assert manifest.task == "multiclass" and manifest.class_names == ("cat", "dog", "eel")
    assert manifest.image_mode == "RGB"
    assert sum(s.num_samples for s in manifest.splits.values()) == 28
    train = manifest.split("train").class_counts
    assert all(abs(train[name] - 0.8 * n) <= 1 for name, n in (("cat", 12), ("dog", 9), ("eel", 7)))
    assert all(shard.num_samples <= 7 for split in manifest.splits.values() for shard in split.shards)
    data = read_dataset(out)
    for split, samples in data.items():
        assert [s["key"] for s in samples] == [f"{split}_{i:08d}" for i in range(len(samples))]
        for sample in samples:
            rel = sample["meta"]["source"]
            folder = rel.split("/")[0]
            assert sample["lbl"].tolist() == [manifest.class_names.index(folder)]
            assert sample["meta"]["labels"] == [folder]
            diff = np.abs(sample["image"].astype(int) - src[rel].astype(int))
            assert diff.mean() < 3 and sample["image"].shape == src[rel].shape
    assert manifest.raw["split_method"] == "stratified"
    assert manifest.raw["skipped"] == {"count": 0, "files": []}


@pytest.mark.parametrize(
    ("mode", "expected"), [("L", "L"), ("RGBA", "L"), ("P", "RGB"), ("RGB", "RGB")], ids=str
)
def test_colour_policy(tmp_path: Path, mode: str, expected: str) -> None:
    """L stays 1-channel, RGBA with gray content becomes L, palette and colour become RGB."""
    channels = 1 if mode in ("L", "RGBA") else 3
    make_tree(tmp_path / "src", {"a": 10, "b": 10}, channels=channels, mode=mode)
    assert pack(tmp_path / "src", tmp_path / "out") == 0
    assert load_manifest(tmp_path / "out").image_mode == expected
    image = read_dataset(tmp_path / "out")["train"][0]["image"]
    assert image.ndim == (2 if expected == "L" else 3)


def test_max_side_keeps_aspect(tmp_path: Path) -> None:
    make_tree(tmp_path / "src", {"a": 10, "b": 10})  # 24x20 (h x w)
    assert pack(tmp_path / "src", tmp_path / "out", "--max-side", "12") == 0
    assert read_dataset(tmp_path / "out")["train"][0]["image"].shape == (12, 10, 3)


def test_source_splits_are_kept(tmp_path: Path) -> None:
    layout = {"train/neg": 8, "train/pos": 6, "valid/neg": 3, "valid/pos": 2, "test/neg": 2, "test/pos": 4}
    make_tree(tmp_path / "src", layout)
    assert pack(tmp_path / "src", tmp_path / "out") == 0
    manifest = load_manifest(tmp_path / "out")
    assert manifest.task == "binary" and manifest.raw["split_method"] == "source"
    assert {name: s.class_counts for name, s in manifest.splits.items()} == {
        "train": {"neg": 8, "pos": 6},
        "val": {"neg": 3, "pos": 2},
        "test": {"neg": 2, "pos": 4},
    }
    assert pack(tmp_path / "src", tmp_path / "o2", "--split-fractions", "0.5,0.25,0.25") == 2
    assert pack(tmp_path / "src", tmp_path / "o3", "--split-fractions", "0.5,0.25,0.25", "--resplit") == 0


@pytest.mark.parametrize("group_by", ["0", r"^(p\d+)/"], ids=["depth", "regex"])
def test_group_split_is_disjoint_and_stratified(tmp_path: Path, group_by: str) -> None:
    rng = np.random.default_rng(0)
    layout = {}
    for patient in range(30):
        layout[f"p{patient:02d}/0"] = int(rng.integers(1, 5))
        layout[f"p{patient:02d}/1"] = int(rng.integers(0, 3))
    layout = {folder: count for folder, count in layout.items() if count}
    make_tree(tmp_path / "src", layout)
    assert pack(tmp_path / "src", tmp_path / "out", "--group-by", group_by, "--seed", "3") == 0
    data = read_dataset(tmp_path / "out")
    groups = {split: {s["meta"]["group"] for s in samples} for split, samples in data.items()}
    assert set(groups) == {"train", "val", "test"}
    assert not (groups["train"] & groups["val"]) and not (groups["train"] & groups["test"])
    assert not (groups["val"] & groups["test"])
    total = sum(layout.values())
    assert abs(len(data["train"]) / total - 0.8) < 0.1
    positive = sum(count for folder, count in layout.items() if folder.endswith("/1")) / total
    train_positive = np.mean([s["lbl"][0] for s in data["train"]])
    assert abs(train_positive - positive) < 0.1
    assert manifest_of(tmp_path / "out")["split_method"] == "stratified_group"


def test_stratification_without_groups() -> None:
    records = [
        Record(None, f"{i:04d}", (c,))
        for c, n in enumerate((60, 30, 10))
        for i in range(c * 100, c * 100 + n)
    ]
    splits = stratified_split(records, parse_fractions("0.6,0.2,0.2"), 3, seed=1)
    for name, fraction in (("train", 0.6), ("val", 0.2), ("test", 0.2)):
        counts = np.bincount([r.labels[0] for r in splits[name]], minlength=3)
        assert np.abs(counts - fraction * np.array([60, 30, 10])).max() <= 1


def test_multilabel_stratification_balances_every_label() -> None:
    rng = np.random.default_rng(0)
    records = [
        Record(None, f"{i:04d}", tuple(np.flatnonzero(rng.random(4) < (0.5, 0.3, 0.1, 0.05))))
        for i in range(400)
    ]
    splits = stratified_split(records, parse_fractions("0.8,0.1,0.1"), 4, seed=0)
    totals = np.bincount([c for r in records for c in r.labels], minlength=4)
    val = np.bincount([c for r in splits["val"] for c in r.labels], minlength=4)
    assert len(splits["val"]) in (39, 40, 41)
    assert np.abs(val - 0.1 * totals).max() <= 2


def test_same_args_same_shards(tmp_path: Path) -> None:
    make_tree(tmp_path / "src", {"a": 15, "b": 15})

    def shas(out: str, *extra: object) -> list[str]:
        assert pack(tmp_path / "src", tmp_path / out, "--shard-size", "5", *extra) == 0
        return [
            s["sha256"] for split in manifest_of(tmp_path / out)["splits"].values() for s in split["shards"]
        ]

    first = shas("o1")
    assert shas("o2", "--workers", "2") == first
    assert shas("o3", "--seed", "1") != first


def test_index_matches_real_wds2idx(tmp_path: Path) -> None:
    make_tree(tmp_path / "src", {"a": 6, "b": 6})
    assert pack(tmp_path / "src", tmp_path / "out") == 0
    for shard in load_manifest(tmp_path / "out").split("train").shards:
        reference = tmp_path / f"{shard.tar.stem}.ref.idx"
        subprocess.run(
            [str(VENV_BIN / "wds2idx"), str(shard.tar), str(reference)], check=True, capture_output=True
        )
        assert shard.index.read_text() == reference.read_text()


def test_dali_reads_the_shards(tmp_path: Path) -> None:
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def, types

    make_tree(tmp_path / "src", {"a": 7, "b": 6}, channels=1, mode="L")
    assert pack(tmp_path / "src", tmp_path / "out", "--shard-size", "4") == 0
    split = load_manifest(tmp_path / "out").split("train")
    expected = read_dataset(tmp_path / "out")["train"]

    @pipeline_def(batch_size=split.num_samples, num_threads=1, device_id=None)
    def pipeline():
        jpg, lbl = fn.readers.webdataset(
            paths=[str(shard.tar) for shard in split.shards],
            index_paths=[str(shard.index) for shard in split.shards],
            ext=["jpg", "lbl"],
            dtypes=[types.UINT8, types.INT32],
            missing_component_behavior="error",
        )
        return fn.decoders.image(jpg, device="cpu", output_type=types.GRAY), lbl

    reader = pipeline()
    reader.build()
    images, labels = reader.run()
    assert [int(labels.at(i)[0]) for i in range(len(expected))] == [int(s["lbl"][0]) for s in expected]
    for i, sample in enumerate(expected):
        assert np.abs(np.asarray(images.at(i))[..., 0].astype(int) - sample["image"]).max() <= 2


def test_cli_runs_as_module(tmp_path: Path) -> None:
    make_tree(tmp_path / "src", {"a": 5, "b": 5})
    result = subprocess.run(
        [sys.executable, "-m", "data_tools.pack", tmp_path / "src", tmp_path / "out", "--workers", "2"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[2],
    )
    assert result.returncode == 0, result.stderr
    assert "packed 10 samples" in result.stdout


# ---------------------------------------------------------------- label-file and npz sources


def test_csv_multilabel(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "img", {"x": 12})
    rng = np.random.default_rng(0)
    truth = {rel: rng.integers(0, 2, 3) for rel in src}
    rows = ["path,Mass,Nodule,Edema,fold"] + [
        f"{rel},{','.join(map(str, bits))},{'train' if i < 8 else 'valid'}"
        for i, (rel, bits) in enumerate(truth.items())
    ]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    labels = "Mass,Nodule,Edema"
    argv = ["--labels-csv", tmp_path / "labels.csv", "--image-col", "path", "--label-cols", labels]
    assert pack(tmp_path / "img", tmp_path / "out", *argv, "--split-col", "fold") == 0
    manifest = load_manifest(tmp_path / "out")
    assert manifest.task == "multilabel" and manifest.class_names == ("Mass", "Nodule", "Edema")
    assert manifest.split("train").num_samples == 8 and manifest.split("val").num_samples == 4
    for samples in read_dataset(tmp_path / "out").values():
        for sample in samples:
            assert sample["lbl"].tolist() == truth[sample["meta"]["source"]].tolist()
    positives = sum(truth[rel] for i, rel in enumerate(truth) if i < 8)
    assert list(manifest.split("train").class_counts.values()) == positives.tolist()


def test_tsv_single_label_with_class_order(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "img", {"x": 20})
    rows = ["file\tgrade"] + [f"{rel}\t{'high' if i % 3 else 'low'}" for i, rel in enumerate(src)]
    (tmp_path / "labels.tsv").write_text("\n".join(rows) + "\n")
    argv = ["--labels-csv", tmp_path / "labels.tsv", "--image-col", "file", "--label-cols", "grade"]
    assert pack(tmp_path / "img", tmp_path / "out", *argv, "--classes", "low,high") == 0
    manifest = load_manifest(tmp_path / "out")
    assert manifest.task == "binary" and manifest.class_names == ("low", "high")
    totals = {name: sum(s.class_counts[name] for s in manifest.splits.values()) for name in ("low", "high")}
    assert totals == {"low": 7, "high": 13}


def test_nih_lists_per_split(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "images", {"images_001/images": 10}, channels=1, mode="L")
    rng = np.random.default_rng(1)
    truth = {Path(rel).name: rng.integers(0, 2, 14) for rel in src}
    names = list(truth)
    for split, chunk in (("train", names[:7]), ("test", names[7:])):
        lines = [f"{name} {' '.join(map(str, truth[name]))}" for name in chunk]
        (tmp_path / f"{split}.txt").write_text("\n".join(lines) + "\n")
    lists = ["--nih-list", f"train={tmp_path / 'train.txt'}", "--nih-list", f"test={tmp_path / 'test.txt'}"]
    assert pack(tmp_path / "images", tmp_path / "out", *lists) == 0
    manifest = load_manifest(tmp_path / "out")
    assert manifest.class_names == NIH_CLASSES and manifest.task == "multilabel"
    assert manifest.image_mode == "L" and set(manifest.splits) == {"train", "test"}
    data = read_dataset(tmp_path / "out")
    assert len(data["train"]) == 7
    for sample in data["train"] + data["test"]:
        assert sample["lbl"].tolist() == truth[sample["meta"]["source"]].tolist()


@pytest.mark.parametrize("multilabel", [False, True], ids=["single", "multi"])
def test_npz(tmp_path: Path, multilabel: bool) -> None:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 12), ("val", 4), ("test", 4)):
        arrays[f"{split}_images"] = np.stack([smooth(i, (16, 16), 3 if multilabel else 1) for i in range(n)])
        arrays[f"{split}_labels"] = rng.integers(0, 2, (n, 5)) if multilabel else rng.integers(0, 3, (n, 1))
    np.savez(tmp_path / "mnist.npz", **arrays)
    assert pack(tmp_path / "mnist.npz", tmp_path / "out") == 0
    manifest = load_manifest(tmp_path / "out")
    assert manifest.task == ("multilabel" if multilabel else "multiclass")
    assert manifest.image_mode == ("RGB" if multilabel else "L")
    for split, samples in read_dataset(tmp_path / "out").items():
        assert len(samples) == len(arrays[f"{split}_labels"])
        for sample in samples:
            index = int(sample["meta"]["source"].split("[")[1].rstrip("]"))
            expected = arrays[f"{split}_labels"][index]
            assert sample["lbl"].tolist() == expected.tolist()
            diff = np.abs(sample["image"].astype(int) - arrays[f"{split}_images"][index].astype(int))
            assert diff.mean() < 4


# ---------------------------------------------------------------- bad input


def truncated_png(path: Path) -> None:
    save(path, smooth(99))
    path.write_bytes(path.read_bytes()[:60])


def _unknown_class(root: Path) -> list[object]:
    make_tree(root, {"a": 3, "b": 3, "c": 2})
    return [root, "--classes", "a,b"]


def _truncated(root: Path) -> list[object]:
    make_tree(root, {"a": 3, "b": 3})
    truncated_png(root / "b" / "broken.png")
    return [root]


def _too_small(root: Path) -> list[object]:
    make_tree(root, {"a": 3, "b": 3})
    save(root / "a" / "tiny.png", smooth(5, (4, 30)))
    return [root, "--min-side", "10"]


def _empty(root: Path) -> list[object]:
    (root / "a").mkdir(parents=True)
    (root / "a" / "notes.txt").write_text("no images here")
    return [root]


def _missing_column(root: Path) -> list[object]:
    make_tree(root, {"x": 3})
    (root.parent / "labels.csv").write_text("path,label\nx/x_0.png,a\n")
    return [root, "--labels-csv", root.parent / "labels.csv", "--image-col", "path", "--label-cols", "x"]


def _bad_cell(root: Path) -> list[object]:
    make_tree(root, {"x": 3})
    (root.parent / "labels.csv").write_text("path,A,B\nx/x_0.png,0,1\nx/x_1.png,1,maybe\n")
    return [root, "--labels-csv", root.parent / "labels.csv", "--image-col", "path", "--label-cols", "A,B"]


def _bad_nih_line(root: Path) -> list[object]:
    make_tree(root, {"x": 2})
    (root.parent / "list.txt").write_text("x_0.png " + "0 " * 14 + "\nx_1.png 0 1\n")
    return [root, "--nih-list", root.parent / "list.txt"]


def _npz_label_out_of_range(root: Path) -> list[object]:
    root.mkdir()
    images, labels = np.zeros((3, 8, 8), np.uint8), np.array([[0], [1], [5]])
    np.savez(root / "bad.npz", train_images=images, train_labels=labels)
    return [root / "bad.npz", "--classes", "a,b"]


def _group_regex_mismatch(root: Path) -> list[object]:
    make_tree(root, {"a": 3, "b": 3})
    return [root, "--group-by", r"patient(\d+)"]


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (_unknown_class, ["c", "not in --classes"]),
        (_truncated, ["broken.png", "cannot decode", "--skip-bad"]),
        (_too_small, ["tiny.png", "30x4", "--min-side 10"]),
        (_empty, ["src", "no images found"]),
        (_missing_column, ["labels.csv", "no column(s) 'x'"]),
        (_bad_cell, ["labels.csv:3", "column 'B'", "'maybe'", "0 or 1"]),
        (_bad_nih_line, ["list.txt:2", "14 labels"]),
        (_npz_label_out_of_range, ["bad.npz", "train_labels[2] is 5", "0..1"]),
        (_group_regex_mismatch, ["a_0.png", "--group-by regex", "does not match"]),
    ],
    ids=lambda value: getattr(value, "__name__", "")[1:],
)
def test_bad_input_is_reported_clearly(
    tmp_path: Path, capsys: pytest.CaptureFixture, build, expected
) -> None:
    argv = build(tmp_path / "src")
    out = tmp_path / "out"
    assert pack(argv[0], out, *argv[1:]) == 2
    message = capsys.readouterr().err
    assert message.startswith("error: ") and "Traceback" not in message
    for fragment in expected:
        assert fragment in message
    assert not out.exists() and not list(tmp_path.glob("out.tmp-*"))


def test_existing_output_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    make_tree(tmp_path / "src", {"a": 5, "b": 5})
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    assert pack(tmp_path / "src", tmp_path / "other") == 2
    assert "--overwrite" in capsys.readouterr().err
    assert pack(tmp_path / "src", tmp_path / "other", "--overwrite") == 2
    assert "not a packed dataset" in capsys.readouterr().err
    assert (tmp_path / "other" / "keep.txt").read_text() == "mine"
    assert pack(tmp_path / "src", tmp_path / "out") == 0
    assert pack(tmp_path / "src", tmp_path / "out", "--seed", "4", "--overwrite") == 0
    assert manifest_of(tmp_path / "out")["args"]["seed"] == 4


def test_skip_bad_records_skipped_files(tmp_path: Path) -> None:
    make_tree(tmp_path / "src", {"a": 6, "b": 6})
    truncated_png(tmp_path / "src" / "a" / "broken.png")
    save(tmp_path / "src" / "b" / "tiny.png", smooth(7, (5, 5)))
    assert pack(tmp_path / "src", tmp_path / "out", "--skip-bad", "--min-side", "8") == 0
    manifest = manifest_of(tmp_path / "out")
    assert manifest["skipped"]["count"] == 2
    reasons = {entry["path"]: entry["reason"] for entry in manifest["skipped"]["files"]}
    assert set(reasons) == {"a/broken.png", "b/tiny.png"}
    assert "cannot decode" in reasons["a/broken.png"] and "--min-side 8" in reasons["b/tiny.png"]
    assert sum(split["num_samples"] for split in manifest["splits"].values()) == 12


@pytest.mark.parametrize("error", [PackError("simulated"), KeyboardInterrupt()], ids=["error", "interrupt"])
def test_failure_while_writing_leaves_no_partial_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    import data_tools.writer

    make_tree(tmp_path / "src", {"a": 10, "b": 10})
    assert pack(tmp_path / "src", tmp_path / "out") == 0
    before = manifest_of(tmp_path / "out")
    real, calls = data_tools.writer.write_shard, []

    def fail_on_second_shard(job):
        calls.append(job)
        if len(calls) % 2 == 0:
            raise error
        return real(job)

    monkeypatch.setattr(data_tools.writer, "write_shard", fail_on_second_shard)
    for out, extra in (("new", []), ("out", ["--overwrite"])):
        with contextlib.suppress(KeyboardInterrupt):
            assert pack(tmp_path / "src", tmp_path / out, "--shard-size", "4", *extra) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
    assert manifest_of(tmp_path / "out") == before


# ---------------------------------------------------------------- task kinds (issue #13)

DR_GRADES = ("No_DR", "Mild", "Moderate", "Severe", "Proliferate")


def test_ordinal_needs_an_explicit_class_order(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    make_tree(tmp_path / "src", {grade: 6 for grade in DR_GRADES})
    assert pack(tmp_path / "src", tmp_path / "nominal") == 0
    nominal = load_manifest(tmp_path / "nominal")
    assert nominal.task == "multiclass" and nominal.class_names == tuple(sorted(DR_GRADES))
    capsys.readouterr()
    assert pack(tmp_path / "src", tmp_path / "guess", "--ordinal") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--ordinal needs the class order" in err and err.count("\n") == 1
    assert not (tmp_path / "guess").exists()
    assert pack(tmp_path / "src", tmp_path / "out", "--ordinal", "--classes", ",".join(DR_GRADES)) == 0
    manifest = load_manifest(tmp_path / "out")
    assert manifest.task == "ordinal" and manifest.class_names == DR_GRADES
    for sample in [s for samples in read_dataset(tmp_path / "out").values() for s in samples]:
        grade = sample["meta"]["source"].split("/")[0]
        assert sample["lbl"].tolist() == [DR_GRADES.index(grade)]


@pytest.mark.parametrize(
    ("layout", "argv", "expected"),
    [
        ({"neg": 3, "pos": 3}, ["--ordinal", "--classes", "neg,pos"], "is a binary task"),
        ({"x": 4}, ["--ordinal", "--label-cols", "A,B,C"], "multi-label"),
    ],
    ids=["two-classes", "multilabel"],
)
def test_ordinal_refusals(tmp_path: Path, capsys: pytest.CaptureFixture, layout, argv, expected) -> None:
    src = make_tree(tmp_path / "src", layout)
    if "--label-cols" in argv:
        rows = ["path,A,B,C"] + [f"{rel},1,0,1" for rel in src]
        (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
        argv = [*argv, "--labels-csv", tmp_path / "labels.csv", "--image-col", "path"]
    assert pack(tmp_path / "src", tmp_path / "out", *argv) == 2
    assert expected in capsys.readouterr().err and not (tmp_path / "out").exists()
