"""The packer touches only what it wrote and reads every folder it is given (issue #26): ``--overwrite``
removes only the earlier dataset's files, links to class folders are followed (loops and dangling links
refused), and an output directory under a file or inside the source is refused at once.  Each case runs the
real command and compares every file under the test's folder (checksums) before and after."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ilm_dist.data.manifest import load_manifest
from ilm_dist.folder_lock import FolderLock
from tests.data_tools.test_pack import make_tree, pack
from tests.integration.test_run_safety import assert_one_line_error, tree

REPO = Path(__file__).parents[2]


def pack_cli(*argv: object) -> subprocess.CompletedProcess:
    """``python -m data_tools.pack ARGV`` as a user runs it (one worker, no progress bars)."""
    cmd = [sys.executable, "-m", "data_tools.pack", *map(str, argv), "--quiet", "--workers", "1"]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.fixture
def packed(tmp_path: Path) -> tuple[Path, Path]:
    """``src`` (classes a, b) packed into ``out``."""
    make_tree(tmp_path / "src", {"a": 6, "b": 6})
    assert pack(tmp_path / "src", tmp_path / "out") == 0
    return tmp_path / "src", tmp_path / "out"


# ---------------------------------------------------------------- --overwrite


def test_overwrite_refuses_what_a_packer_did_not_write(packed, tmp_path: Path) -> None:
    src, out = packed
    (out / "NOTES.txt").write_text("mine")
    (out / "analysis").mkdir()
    (out / "analysis" / "plot.py").write_text("print('mine')")
    before = tree(tmp_path)
    proc = pack_cli(src, out, "--overwrite")
    assert_one_line_error(
        proc,
        f"error: {out}: refusing to overwrite, it holds what is not part of its packed dataset: "
        "NOTES.txt, analysis/ (2 in all)",
    )
    assert tree(tmp_path) == before and sorted(os.listdir(tmp_path)) == ["out", "src"]


def test_overwrite_removes_exactly_the_earlier_datasets_files(packed, tmp_path: Path) -> None:
    src, out = packed
    assert pack(src, out, "--overwrite", "--shard-size", "2") == 0  # more shards than the first time
    proc = pack_cli(src, out, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert {path.name for path in out.iterdir()} == load_manifest(out).file_names
    assert sorted(os.listdir(tmp_path)) == ["out", "src"]


def test_overwrite_through_a_link_replaces_the_dataset_it_points_to(packed, tmp_path: Path) -> None:
    src, out = packed
    (tmp_path / "link").symlink_to("out")
    proc = pack_cli(src, tmp_path / "link", "--overwrite", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    assert os.readlink(tmp_path / "link") == "out" and load_manifest(out).raw["args"]["seed"] == 3
    assert {path.name for path in out.iterdir()} == load_manifest(out).file_names
    assert sorted(os.listdir(tmp_path)) == ["link", "out", "src"]


def test_overwrite_refuses_a_manifest_naming_files_outside_its_folder(packed, tmp_path: Path) -> None:
    src, out = packed
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["splits"]["val"]["shards"][0]["name"] = "../src/a/a_0.png"
    (out / "manifest.json").write_text(json.dumps(manifest))
    before = tree(tmp_path)
    proc = pack_cli(src, out, "--overwrite")
    assert_one_line_error(
        proc, f"error: refusing to overwrite {out}: ", "'../src/a/a_0.png'; expected a plain file name"
    )
    assert tree(tmp_path) == before and sorted(os.listdir(tmp_path)) == ["out", "src"]


# ---------------------------------------------------------------- links in the source tree


def test_linked_class_folder_is_packed(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src, {"a": 6, "b": 6})
    make_tree(tmp_path / "elsewhere", {"c": 6})
    (src / "c").symlink_to(tmp_path / "elsewhere" / "c")
    before = tree(tmp_path)
    proc = pack_cli(src, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert "packed 18 samples" in proc.stdout and "multiclass" in proc.stdout and "0 skipped" in proc.stdout
    manifest = load_manifest(tmp_path / "out")
    assert manifest.class_names == ("a", "b", "c")
    assert sum(split.class_counts["c"] for split in manifest.splits.values()) == 6
    assert {k: v for k, v in tree(tmp_path).items() if not k.startswith("out/")} == before


def _loop(src: Path) -> tuple[Path, str]:
    (src / "a" / "loop").symlink_to("..")
    return src / "a" / "loop", f"leads to {src}, a folder that contains it (a loop); remove the link"


def _up(src: Path) -> tuple[Path, str]:
    (src / "up").symlink_to("..")
    return src / "up", f"leads to {src.parent}, a folder that contains it (a loop); remove the link"


def _dangling(src: Path) -> tuple[Path, str]:
    (src / "c").symlink_to(src.parent / "moved")
    return src / "c", f"is a link to {src.parent / 'moved'}, which does not exist"


@pytest.mark.parametrize("link", [_loop, _up, _dangling], ids=lambda f: f.__name__[1:])
def test_bad_folder_link_is_refused_naming_it(tmp_path: Path, link) -> None:
    make_tree(tmp_path / "src", {"a": 6, "b": 6})
    path, message = link(tmp_path / "src")
    before = tree(tmp_path)
    proc = pack_cli(tmp_path / "src", tmp_path / "out")
    assert_one_line_error(proc, f"error: {path}: {message}")
    assert tree(tmp_path) == before and sorted(os.listdir(tmp_path)) == ["src"]


# ---------------------------------------------------------------- where the output goes


def test_output_under_a_file_is_refused(tmp_path: Path) -> None:
    make_tree(tmp_path / "src", {"a": 6, "b": 6})
    (tmp_path / "notes").write_text("mine")
    before = tree(tmp_path)
    proc = pack_cli(tmp_path / "src", tmp_path / "notes" / "out")
    assert_one_line_error(
        proc, f"error: {tmp_path / 'notes' / 'out'}: cannot be created, {tmp_path / 'notes'} is a file"
    )
    assert tree(tmp_path) == before and sorted(os.listdir(tmp_path)) == ["notes", "src"]


@pytest.mark.parametrize(
    ("source", "out"),
    [("src", "src/packed"), ("src", "src/a/packed"), ("src", "link/packed"), ("link", "src/packed")],
    ids=["inside", "in-a-class", "through-a-link", "source-through-a-link"],
)
def test_output_inside_the_source_is_refused(tmp_path: Path, source: str, out: str) -> None:
    make_tree(tmp_path / "src", {"a": 6, "b": 6})
    (tmp_path / "link").symlink_to("src")
    before = tree(tmp_path)
    proc = pack_cli(tmp_path / source, tmp_path / out)
    assert_one_line_error(proc, f"error: {tmp_path / out}: is inside the source {tmp_path / source}, ")
    assert tree(tmp_path) == before and sorted(os.listdir(tmp_path)) == ["link", "src"]


def test_a_second_packer_on_the_same_output_is_refused_naming_the_first(tmp_path):
    """While one packer holds OUT (its lock beside it), another stops at once, even with --overwrite, and
    leaves OUT and its parent as they were."""
    out = tmp_path / "out"
    lock = FolderLock(tmp_path, "packer of out", name=".out.lock")
    try:
        before = sorted(p.name for p in tmp_path.iterdir())
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "data_tools.synthetic_dataset",
                str(out),
                "--per-class",
                "4",
                "--overwrite",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        assert sorted(p.name for p in tmp_path.iterdir()) == before
    finally:
        lock.release()
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"error: {out} is in use by packer of out pid {os.getpid()} on "), (
        proc.stderr
    )
    assert not out.exists() and list(tmp_path.iterdir()) == []
