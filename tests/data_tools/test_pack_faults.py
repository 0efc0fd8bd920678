"""The packer under faults and odd input (issue #13): a full disk, Ctrl-C, a killed earlier run, empty
class folders, images at the wrong depth. Each ends with one line naming the file, and leaves nothing
behind: no staging directory, and an earlier output byte-for-byte as it was."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import data_tools.shard_writer
import data_tools.writer
from ilm_dist.data.manifest import load_manifest
from tests.data_tools.test_pack import make_tree, pack

REPO = Path(__file__).parents[2]
NO_SPACE = os.strerror(errno.ENOSPC)  # "No space left on device"


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


class FullDisk(io.FileIO):
    """A real file on which writing past ``budget`` bytes fails as on a full disk."""

    def __init__(self, path, mode: str, budget: int):
        super().__init__(path, mode)
        self.budget = budget

    def write(self, data) -> int:
        if self.tell() + len(data) > self.budget:
            raise OSError(errno.ENOSPC, NO_SPACE)
        return super().write(data)


def full_disk_open(suffix: str):
    """``open`` that returns a `FullDisk` for files ending in ``suffix`` (text mode through a wrapper)."""

    def fake_open(path, mode="r", *args, **kwargs):
        if not str(path).endswith(suffix):
            return open(path, mode, *args, **kwargs)
        raw = FullDisk(path, "w", budget=12_000 if "b" in mode else 100)
        return raw if "b" in mode else io.TextIOWrapper(raw)

    return fake_open


@pytest.fixture
def packed(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    make_tree(tmp_path / "src", {"a": 20, "b": 20})
    assert pack(tmp_path / "src", tmp_path / "out") == 0
    return tmp_path / "out", tree_digest(tmp_path / "out")


@pytest.mark.parametrize(
    ("module", "suffix", "workers"),
    [
        (data_tools.shard_writer, ".tar", "1"),
        (data_tools.shard_writer, ".tar", "2"),
        (data_tools.writer, "manifest.json.partial", "1"),
    ],
    ids=["shard", "shard-in-worker", "manifest"],
)
def test_full_disk_names_the_file_and_leaves_nothing(
    packed,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    module,
    suffix,
    workers,
) -> None:
    out, before = packed
    monkeypatch.setattr(module, "open", full_disk_open(suffix), raising=False)
    capsys.readouterr()
    for target, extra in ((tmp_path / "new", []), (out, ["--overwrite"])):
        assert pack(tmp_path / "src", target, "--shard-size", "16", "--workers", workers, *extra) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert err.startswith(f"error: {tmp_path / target.name}.tmp-") and err.endswith(
            f"{suffix}: {NO_SPACE}\n"
        ), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no staging directory, no new output
    assert tree_digest(out) == before


SLOW_PACK = """
import signal, sys, time
from pathlib import Path
import data_tools.shard_writer as shards
from data_tools.pack import main

# as a terminal's foreground job: a suite started in the background by a non-interactive shell (`make test &`)
# passes SIGINT down ignored, and Python then never raises KeyboardInterrupt
signal.signal(signal.SIGINT, signal.default_int_handler)

real, started = shards.render, Path(sys.argv[1])

def slow_render(*args, **kwargs):
    started.touch()
    time.sleep(1.0)  # 40 samples on 2 workers: ~20 s, so Ctrl-C lands mid-pack even on a loaded machine
    return real(*args, **kwargs)

shards.render = slow_render
sys.exit(main(sys.argv[2:]))
"""


def test_ctrl_c_prints_one_line_and_cleans_up(packed, tmp_path: Path) -> None:
    out, before = packed
    (tmp_path / "slow_pack.py").write_text(SLOW_PACK)
    started = tmp_path / "started"
    argv = [sys.executable, tmp_path / "slow_pack.py", started, tmp_path / "src", out, "--overwrite"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [*map(str, argv), "--workers", "2", "--shard-size", "4", "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert started.exists() and list(tmp_path.glob("out.tmp-*"))
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole process group
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 2, stderr
    assert stderr == f"interrupted: nothing was written, {out} is as it was\n", stderr
    assert stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "slow_pack.py", "src", "started"]
    assert tree_digest(out) == before


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.parametrize("kind", ["tmp", "old"])
def test_stale_staging_of_a_dead_packer_is_removed_and_named(
    packed, tmp_path: Path, capsys: pytest.CaptureFixture, kind: str
) -> None:
    out, _ = packed
    pid = dead_pid()
    stale = tmp_path / f"out.{kind}-{pid}"
    stale.mkdir()
    (stale / "train-000000.tar").write_bytes(b"half")
    (stale / "manifest.json.partial").write_text("{")
    capsys.readouterr()
    assert pack(tmp_path / "src", out, "--overwrite") == 0
    err = capsys.readouterr().err
    assert f"note: removed {stale}, left by an interrupted packer (process {pid} is not running)" in err
    assert not stale.exists() and load_manifest(out).num_classes == 2


def test_staging_of_a_running_process_is_refused(
    packed, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out, before = packed
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        busy = tmp_path / f"out.tmp-{sleeper.pid}"
        busy.mkdir()
        (busy / "train-000000.tar").write_bytes(b"being written")
        capsys.readouterr()
        assert pack(tmp_path / "src", out, "--overwrite") == 2
        err = capsys.readouterr().err
        assert (
            err
            == f"error: {busy}: process {sleeper.pid} is writing {out} (another packer?); wait for it, or stop it and remove this directory\n"
        )
        assert (busy / "train-000000.tar").read_bytes() == b"being written" and tree_digest(out) == before
    finally:
        sleeper.kill()
        sleeper.wait()


def test_stale_directory_with_foreign_files_is_left_alone(
    packed, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out, before = packed
    stale = tmp_path / f"out.tmp-{dead_pid()}"
    stale.mkdir()
    (stale / "thesis.docx").write_text("mine")
    capsys.readouterr()
    assert pack(tmp_path / "src", out, "--overwrite") == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(f"error: {stale}: left by process") and "thesis.docx" in err and err.count("\n") == 1
    )
    assert (stale / "thesis.docx").read_text() == "mine" and tree_digest(out) == before


def test_empty_class_folder_is_an_error_unless_allowed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    make_tree(tmp_path / "src", {"a": 6, "b": 6, "c": 6})
    (tmp_path / "src" / "d").mkdir()
    (tmp_path / "src" / "e").mkdir()
    (tmp_path / "src" / "e" / "scan.dcm.txt").write_text("not an image")
    before = tree_digest(tmp_path / "src")
    assert pack(tmp_path / "src", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'src' / 'd'}: folder has no images (2 such folder(s))")
    assert "--allow-empty-folders" in err and err.count("\n") == 1 and not (tmp_path / "out").exists()
    assert pack(tmp_path / "src", tmp_path / "out", "--allow-empty-folders") == 0
    assert "note: ignored 2 folder(s) without images" in capsys.readouterr().err
    assert load_manifest(tmp_path / "out").class_names == ("a", "b", "c")
    assert tree_digest(tmp_path / "src") == before


def test_image_one_folder_too_deep_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    make_tree(tmp_path / "src", {"neg": 8, "pos": 8, "pos/extra": 1})
    assert pack(tmp_path / "src", tmp_path / "out") == 2
    err = capsys.readouterr().err
    deep = tmp_path / "src" / "pos" / "extra" / "pos_extra_0.png"
    assert err.startswith(
        f"error: {deep}: is 2 folder(s) deep under {tmp_path / 'src'}, but 16 of 17 images are 1 deep"
    )
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()
