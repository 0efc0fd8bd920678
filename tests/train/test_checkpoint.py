"""Checkpoint bookkeeping without DeepSpeed: the atomic ``latest``, rotation, errors, and a failed save.

The engine is a small stand-in with DeepSpeed's ``save_checkpoint``/``load_checkpoint`` signatures that
writes real files (through :func:`ilm_dist.serialization.save_tensors`, as the trainer's engine does), so a
file that is a symlink to ``/dev/full`` fails with a real ENOSPC. No process group: every barrier is a no-op.
"""

import errno
import os
from pathlib import Path

import pytest
import torch

from ilm_dist.errors import InputError
from ilm_dist.serialization import CheckpointWriteError, save_tensors
from ilm_dist.train import checkpoint
from ilm_dist.train.checkpoint import FULL_OPTIMIZER_STATE
from ilm_dist.train.run_dir import RunDir

MODEL_STATES = "mp_rank_00_model_states.pt"
OPTIM_STATES = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


class FakeEngine:
    """DeepSpeed's checkpoint calls, writing (or loading) one model-states and one optimizer file per tag."""

    def __init__(self, zero_stage: int = 0, fail: OSError | None = None, load_error: Exception | None = None):
        self.zero_stage, self.fail, self.load_error = zero_stage, fail, load_error
        self.saved: list[tuple[str, dict]] = []
        self.loaded: list[dict] = []

    def zero_optimization_stage(self) -> int:
        return self.zero_stage

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool) -> None:
        assert not save_latest, "checkpoint.save writes 'latest' itself"
        out = Path(save_dir) / tag
        out.mkdir(parents=True, exist_ok=True)
        self.saved.append((tag, client_state))
        save_tensors({"module": {"w": torch.ones(3)}, **client_state}, out / MODEL_STATES)
        if self.fail is not None:  # e.g. the disk fills up between DeepSpeed's files
            raise self.fail
        save_tensors({"state": torch.zeros(3)}, out / OPTIM_STATES)

    def load_checkpoint(self, load_dir: str, tag: str, load_optimizer_states: bool):
        self.loaded.append({"dir": load_dir, "tag": tag, "load_optimizer_states": load_optimizer_states})
        if self.load_error is not None:
            raise self.load_error
        states = torch.load(Path(load_dir) / tag / MODEL_STATES, weights_only=True)
        return str(Path(load_dir) / tag), {k: v for k, v in states.items() if k != "module"}


def tags(out: Path) -> list[str]:
    return sorted(p.name for p in RunDir(out).checkpoints.iterdir() if p.name.startswith("step_"))


def latest_text(out: Path) -> str:
    return RunDir(out).latest.read_text()


def save(out: Path, step: int, engine: FakeEngine | None = None, keep: int = 3) -> Path:
    return checkpoint.save(
        engine or FakeEngine(), RunDir(out), step, {"moco": {"step": torch.tensor(step)}}, keep
    )


# --------------------------------------------------------------------------- save, latest, rotation


def test_save_writes_the_tag_then_names_it_in_latest(tmp_path):
    engine = FakeEngine()
    path = save(tmp_path, 7, engine)
    assert path == RunDir(tmp_path).checkpoints / "step_7"
    assert sorted(p.name for p in path.iterdir()) == [MODEL_STATES, OPTIM_STATES]
    assert latest_text(tmp_path) == "step_7"
    assert checkpoint.latest_checkpoint(RunDir(tmp_path)) == path
    # the client state travels with DeepSpeed's save, plus the (absent without ZeRO) full optimizer state
    [(tag, client_state)] = engine.saved
    assert tag == "step_7" and client_state[FULL_OPTIMIZER_STATE] is None
    assert int(client_state["moco"]["step"]) == 7
    assert not list(RunDir(tmp_path).checkpoints.glob(".*"))  # no temporary file left behind


def test_saving_the_latest_step_again_writes_nothing(tmp_path):
    save(tmp_path, 4)
    before = os.stat(RunDir(tmp_path).latest)
    engine = FakeEngine()
    assert save(tmp_path, 4, engine) == RunDir(tmp_path).checkpoints / "step_4"
    assert engine.saved == []
    after = os.stat(RunDir(tmp_path).latest)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_rotation_keeps_the_newest_tags_by_step_number(tmp_path):
    root = RunDir(tmp_path).checkpoints
    (root / "step_notes").mkdir(parents=True)  # not a checkpoint tag: never rotated away
    (root / "README").write_text("mine")
    for step in (1, 2, 9, 10):  # as text, step_10 sorts before step_2 and step_9
        save(tmp_path, step, keep=2)
    assert tags(tmp_path) == ["step_10", "step_9", "step_notes"]
    assert latest_text(tmp_path) == "step_10"
    assert (root / "README").read_text() == "mine"
    save(tmp_path, 100, keep=1)
    assert tags(tmp_path) == ["step_100", "step_notes"]


def test_a_failed_latest_write_keeps_the_old_latest_and_names_the_file(tmp_path):
    save(tmp_path, 2)
    root = RunDir(tmp_path).checkpoints
    tmp = root / f".{RunDir.LATEST}.tmp"
    tmp.symlink_to("/dev/full")  # the next write of 'latest' fails with a real ENOSPC
    with pytest.raises(CheckpointWriteError) as caught:
        save(tmp_path, 4)
    assert caught.value.errno == errno.ENOSPC
    message = str(caught.value)
    assert str(root / RunDir.LATEST) in message and "No space left on device" in message
    assert "'latest' was not changed" in message
    assert latest_text(tmp_path) == "step_2"
    assert not tmp.is_symlink() and not tmp.exists()  # the temporary file was removed
    assert checkpoint.latest_checkpoint(RunDir(tmp_path)) == root / "step_2"


@pytest.mark.parametrize("how", ["dev_full", "oserror"])
def test_a_failed_save_removes_the_partial_tag_and_keeps_the_previous_one(tmp_path, how):
    save(tmp_path, 2)
    save(tmp_path, 4)
    root = RunDir(tmp_path).checkpoints
    before = {p.name: p.read_bytes() for p in (root / "step_4").iterdir()}
    latest_before = os.stat(root / RunDir.LATEST)
    if how == "dev_full":  # DeepSpeed's optimizer file lands on a full disk: a real ENOSPC
        (root / "step_6").mkdir()
        (root / "step_6" / OPTIM_STATES).symlink_to("/dev/full")
        engine = FakeEngine()
    else:
        engine = FakeEngine(fail=OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(CheckpointWriteError) as caught:
        save(tmp_path, 6, engine)
    assert caught.value.errno == errno.ENOSPC
    message = str(caught.value)
    assert "No space left on device" in message
    assert f"removed the partial {root / 'step_6'}" in message
    assert f"the previous checkpoint {root / 'step_4'} and 'latest' are intact" in message
    if how == "dev_full":
        assert str(root / "step_6" / OPTIM_STATES) in message
    assert not (root / "step_6").exists()
    assert tags(tmp_path) == ["step_2", "step_4"]  # no rotation either
    assert {p.name: p.read_bytes() for p in (root / "step_4").iterdir()} == before
    latest_after = os.stat(root / RunDir.LATEST)
    assert (latest_after.st_ino, latest_after.st_mtime_ns) == (
        latest_before.st_ino,
        latest_before.st_mtime_ns,
    )
    assert latest_text(tmp_path) == "step_4"


def test_a_failed_first_save_says_there_is_no_earlier_checkpoint(tmp_path):
    with pytest.raises(CheckpointWriteError, match="no earlier checkpoint"):
        save(tmp_path, 1, FakeEngine(fail=OSError(errno.EIO, "Input/output error")))
    assert tags(tmp_path) == []
    assert not RunDir(tmp_path).latest.exists()


# --------------------------------------------------------------------------- finding and counting checkpoints


def one_line_input_error(fn, *args) -> str:
    with pytest.raises(InputError) as caught:
        fn(*args)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_latest_checkpoint_without_latest_names_the_directory(tmp_path):
    message = one_line_input_error(checkpoint.latest_checkpoint, RunDir(tmp_path))
    assert str(RunDir(tmp_path).checkpoints) in message and "no 'latest' file" in message


def test_latest_checkpoint_naming_a_missing_tag_names_both(tmp_path):
    root = RunDir(tmp_path).checkpoints
    root.mkdir()
    (root / RunDir.LATEST).write_text("step_8\n")
    message = one_line_input_error(checkpoint.latest_checkpoint, RunDir(tmp_path))
    assert str(root / RunDir.LATEST) in message and str(root / "step_8") in message and "missing" in message


@pytest.mark.parametrize("text", ["", "\n", "../../elsewhere", "global_step8"])
def test_latest_checkpoint_refuses_a_latest_that_names_no_tag(tmp_path, text):
    root = RunDir(tmp_path).checkpoints
    (root / "step_8").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (root / "global_step8").mkdir()
    (root / RunDir.LATEST).write_text(text)
    message = one_line_input_error(checkpoint.latest_checkpoint, RunDir(tmp_path))
    assert str(root / RunDir.LATEST) in message and "step_<N>" in message


def test_zero_world_size_counts_the_optimizer_partitions(tmp_path):
    assert checkpoint.zero_world_size(tmp_path) == 0
    (tmp_path / MODEL_STATES).write_bytes(b"")
    assert checkpoint.zero_world_size(tmp_path) == 0  # no ZeRO: the optimizer lives in the model states
    for rank in range(3):
        (tmp_path / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"")
    assert checkpoint.zero_world_size(tmp_path) == 3


# --------------------------------------------------------------------------- restore


def test_restore_returns_the_saved_client_state(tmp_path):
    save(tmp_path, 3)
    engine = FakeEngine()
    client_state = checkpoint.restore(engine, RunDir(tmp_path), world_size=1)
    assert int(client_state["moco"]["step"]) == 3
    assert engine.loaded == [
        {"dir": str(RunDir(tmp_path).checkpoints), "tag": "step_3", "load_optimizer_states": True}
    ]


def test_restore_on_another_world_size_under_zero_needs_the_full_optimizer_copy(tmp_path):
    save(tmp_path, 3)  # one partition, and no full copy (as written without ZeRO, or by an older ilm_dist)
    engine = FakeEngine(zero_stage=1)
    message = one_line_input_error(checkpoint.restore, engine, RunDir(tmp_path), 2)
    assert str(RunDir(tmp_path).checkpoints / "step_3") in message
    assert "partitions for 1 ranks" in message and "resume it on 1 ranks" in message
    assert engine.loaded[0]["load_optimizer_states"] is False  # the partitions do not fit 2 ranks


def test_restore_of_state_that_does_not_fit_is_one_line_naming_the_checkpoint(tmp_path):
    save(tmp_path, 3)
    error = RuntimeError("Error(s) in loading state_dict for MoCoILM:\n\tsize mismatch for w: [3] vs [4]")
    message = one_line_input_error(checkpoint.restore, FakeEngine(load_error=error), RunDir(tmp_path), 1)
    assert str(RunDir(tmp_path).checkpoints / "step_3") in message
    assert "Error(s) in loading state_dict for MoCoILM:" in message and "size mismatch" not in message


def test_restore_reads_the_moco_sidecar_of_older_checkpoints(tmp_path):
    root = RunDir(tmp_path).checkpoints / "step_5"
    root.mkdir(parents=True)
    save_tensors({"module": {}}, root / MODEL_STATES)  # written before the MoCo state moved into it
    save_tensors({"queue": torch.arange(4.0)}, root / checkpoint.LEGACY_MOCO_STATE)
    (root.parent / RunDir.LATEST).write_text("step_5")
    client_state = checkpoint.restore(FakeEngine(), RunDir(tmp_path), 1)
    assert torch.equal(client_state["moco"]["queue"], torch.arange(4.0))
