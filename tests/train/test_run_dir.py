"""The run directory belongs to one run: refused without --overwrite, emptied of exactly the run's files with
it, and a resumed run's metrics.jsonl cut back to its checkpoint; RunDir names every file of a run."""

import json
import re

import pytest

from ilm_dist.errors import InputError
from ilm_dist.train.run_dir import RunDir

METRICS = "metrics.jsonl"
# What launch/pretrain.py writes and the evaluation commands, sweeps and experiments read, spelled out here
# as docs/ and the configs spell them (an independent reference for the names RunDir owns).
RUN_FILES = (
    "config.yaml",
    "metrics.jsonl",
    "tensorboard",
    "checkpoints",
    "heartbeat",
    "backbone.pt",
    "backbone_best.pt",
    "backbone_last.pt",
    "best.json",
    "final_state.json",
    "knn_check.json",
    "resume_changes.jsonl",
)


def prepare_fresh(out, overwrite: bool) -> None:
    RunDir(out).prepare_fresh(overwrite)


def keep_metrics_until(out, step: int) -> int:
    return RunDir(out).keep_metrics_until(step)


def test_every_name_of_a_run_and_its_path(tmp_path):
    run = RunDir(tmp_path / "r")
    assert RunDir.names() == RUN_FILES
    assert run.config == tmp_path / "r" / "config.yaml" and RunDir.config.name == "config.yaml"
    assert run.metrics == tmp_path / "r" / METRICS
    assert run.latest == tmp_path / "r" / "checkpoints" / "latest"
    assert run.checkpoint(12) == run.checkpoint("step_12") == tmp_path / "r" / "checkpoints" / "step_12"
    assert run.heartbeat(3) == tmp_path / "r" / "heartbeat" / "rank3"
    assert (run.backbone, run.best_backbone, run.last_backbone) == tuple(
        tmp_path / "r" / name for name in ("backbone.pt", "backbone_best.pt", "backbone_last.pt")
    )
    assert run.final_state.name == "final_state.json" and run.resume_changes.name == "resume_changes.jsonl"
    assert RunDir.TAG.match("step_12") and not RunDir.TAG.match("step_x")


def test_latest_tag_is_what_the_latest_file_says(tmp_path):
    run = RunDir(tmp_path)
    assert run.latest_tag() is None
    make_run(tmp_path)
    assert run.latest_tag() == "step_2"
    (tmp_path / "checkpoints" / "latest").write_text("step_5\n")
    assert run.latest_tag() == "step_5"


def make_run(out) -> None:
    (out / "checkpoints" / "step_2").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("step_2")
    (out / "config.yaml").write_text("name: a\n")
    (out / "backbone.pt").write_bytes(b"weights")


def test_an_empty_or_foreign_output_dir_is_accepted_untouched(tmp_path):
    prepare_fresh(tmp_path, overwrite=False)
    (tmp_path / "notes.txt").write_text("mine")
    prepare_fresh(tmp_path, overwrite=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_run_in_output_dir_is_refused_naming_it_and_its_files(tmp_path):
    make_run(tmp_path)
    with pytest.raises(InputError) as caught:
        prepare_fresh(tmp_path, overwrite=False)
    message = str(caught.value)
    assert f"output_dir {tmp_path} holds an earlier run (config.yaml, checkpoints, backbone.pt)" in message
    assert "--resume" in message and "--overwrite" in message and "\n" not in message
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_2"


def test_overwrite_deletes_exactly_the_run_files(tmp_path, caplog):
    make_run(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    elsewhere = tmp_path.parent / f"{tmp_path.name}_tb"
    (elsewhere / "events").mkdir(parents=True)
    (tmp_path / "tensorboard").symlink_to(elsewhere)  # a link is removed, not what it points to
    with caplog.at_level("WARNING", logger="ilm_dist"):
        prepare_fresh(tmp_path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert (elsewhere / "events").is_dir()
    assert "config.yaml, tensorboard, checkpoints, backbone.pt" in caplog.text


def write_metrics(out, steps: list[int]) -> None:
    (out / METRICS).write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in steps))


def test_a_resume_drops_the_records_after_its_checkpoint(tmp_path):
    write_metrics(tmp_path, [1, 2, 3, 4, 5, 6])
    assert keep_metrics_until(tmp_path, 4) == 2
    records = [json.loads(line) for line in (tmp_path / METRICS).read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[3]["loss"] == 0.25
    assert keep_metrics_until(tmp_path, 4) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [METRICS]  # no temporary file left
    assert keep_metrics_until(tmp_path / "missing", 4) == 0


def test_a_foreign_metrics_file_is_refused_naming_it_and_left_alone(tmp_path):
    write_metrics(tmp_path, [1, 2])
    with (tmp_path / METRICS).open("a") as f:
        f.write('{"epoch": 3}\n')
    before = (tmp_path / METRICS).read_text()
    with pytest.raises(
        InputError, match=rf"^{re.escape(str(tmp_path / METRICS))}: not a metrics record .*epoch"
    ):
        keep_metrics_until(tmp_path, 1)
    assert (tmp_path / METRICS).read_text() == before
