"""Output folders and the names that become folder names are checked before any work: one line, exit 2."""

from __future__ import annotations

import os

import pytest

from ilm_dist.errors import ConfigError, InputError
from ilm_dist.eval.commands import analyse_main, probe_main
from ilm_dist.paths import NAME_RULE, check_name, check_output_dir
from ilm_dist.pretrain import pretrain_main
from tests.launcher import REPO


def test_a_folder_that_exists_or_can_be_created_passes_and_nothing_is_created(tmp_path):
    check_output_dir(tmp_path, "output_dir")
    check_output_dir(tmp_path / "a" / "b", "output_dir")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: (root / "f").touch() or root / "f", "exists and is not a directory"),
        (
            lambda root: (root / "f").touch() or root / "f" / "run",
            "cannot be created, {root}/f is a file, not a directory",
        ),
        (lambda root: (root / "f").symlink_to(root / "gone") or root / "f", "exists and is not a directory"),
    ],
    ids=["a file", "below a file", "a dangling link"],
)
def test_what_mkdir_would_refuse_is_named(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(InputError) as err:
        check_output_dir(path, "--out")
    assert str(err.value) == f"--out {path}: {message.format(root=tmp_path)}"
    with pytest.raises(OSError):  # the check agrees with mkdir
        path.mkdir(parents=True, exist_ok=True)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_a_folder_that_cannot_be_written_is_named(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(InputError, match="is not writable"):
        check_output_dir(locked, "output_dir")
    with pytest.raises(InputError, match=f"cannot be created, {locked} is not writable"):
        check_output_dir(locked / "run", "output_dir")


def run_main(main, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err


def test_pretraining_refuses_a_file_as_output_dir(tmp_path, capsys):
    (tmp_path / "f").touch()
    demo = str(REPO / "configs" / "demo.yaml")
    err = run_main(
        pretrain_main, ["--config", demo, "data.backend=synthetic", f"output_dir={tmp_path}/f"], capsys
    )
    assert err == f"error: output_dir {tmp_path}/f: exists and is not a directory\n"


@pytest.mark.parametrize("command", ["probe", "analyse"])
def test_evaluations_refuse_a_file_as_out(tmp_path, capsys, command):
    (tmp_path / "f").touch()
    out = f"{tmp_path}/f/report"
    if command == "probe":
        err = run_main(
            probe_main,
            ["--weights", "random", "--config", str(REPO / "configs/demo.yaml"), "--out", out],
            capsys,
        )
    else:
        err = run_main(analyse_main, [str(tmp_path), "--out", out], capsys)
    assert err == f"error: --out {out}: cannot be created, {tmp_path}/f is a file, not a directory\n"


@pytest.mark.parametrize("name", ["moco", "moco_bt.v2-1", "run", "é", ".hidden", "a..b"])
def test_a_name_is_one_plain_folder_name(name):
    check_name(name, "name")


@pytest.mark.parametrize(
    "name", ["", ".", "..", "a/b", "/abs", "a\\b", "a\0b", "-x", "my run", "a\n", 3, None]
)
def test_a_name_that_is_not_one_plain_folder_name_is_refused_naming_key_and_value(name):
    with pytest.raises(ConfigError) as err:
        check_name(name, "methods")
    assert str(err.value) == f"methods: {name!r}: {NAME_RULE}"


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("..", NAME_RULE),
        ("a/b", NAME_RULE),
        ("subsets", "reserved, EVAL_DIR/subsets holds the label subsets"),
    ],
)
def test_evaluations_refuse_a_name_that_is_not_a_method_folder(tmp_path, capsys, name, problem):
    demo = str(REPO / "configs" / "demo.yaml")
    argv = ["--weights", "random", "--config", demo, "--out", str(tmp_path / "ev"), "--name", name]
    assert run_main(probe_main, argv, capsys) == f"error: --name: {name!r}: {problem}\n"
    assert list(tmp_path.iterdir()) == []


def test_pretraining_refuses_a_run_name_that_is_not_one_folder_name(tmp_path, capsys):
    demo = str(REPO / "configs" / "demo.yaml")
    err = run_main(
        pretrain_main,
        [
            "--config",
            demo,
            "data.backend=synthetic",
            f"output_dir={tmp_path}",
            "train.max_steps=1",
            "name=..",
        ],
        capsys,
    )
    assert err == f"error: name: '..': {NAME_RULE}\n"
