"""metrics.jsonl and TensorBoard: one JSON line per record, scalars under train/, nothing on other ranks."""

import json

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ilm_dist.train.metrics_log import MetricsLogger
from ilm_dist.train.run_dir import RunDir


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_records_go_to_metrics_jsonl_and_numbers_to_tensorboard(tmp_path):
    logger = MetricsLogger(RunDir(tmp_path), enabled=True)
    logger.log({"step": 1, "loss": 2.5, "lr": 0.1, "note": "warm-up"})
    logger.log({"step": 2, "loss": 2.0, "lr": 0.1})
    logger.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 1, "loss": 2.5, "lr": 0.1, "note": "warm-up"},
        {"step": 2, "loss": 2.0, "lr": 0.1},
    ]
    logged = scalars(tmp_path / "tensorboard")
    assert sorted(logged) == ["train/loss", "train/lr"]  # not the step, not the text
    assert logged["train/loss"] == [(1, 2.5), (2, 2.0)]


def test_a_resumed_logger_appends(tmp_path):
    first = MetricsLogger(RunDir(tmp_path), enabled=True)
    first.log({"step": 1, "loss": 3.0})
    first.close()
    resumed = MetricsLogger(RunDir(tmp_path), enabled=True, first_step=2)
    resumed.log({"step": 2, "loss": 1.0})
    resumed.close()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_a_disabled_logger_writes_nothing(tmp_path):
    logger = MetricsLogger(RunDir(tmp_path), enabled=False)
    logger.log({"step": 1, "loss": 1.0})
    logger.close()
    assert list(tmp_path.iterdir()) == []
