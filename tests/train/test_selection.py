"""The best backbone: the lowest finite value wins, its files are renamed into place on rank 0, its state
travels through a checkpoint, and a checkpoint selected under another criterion is not carried over."""

import json
import math

import pytest
import torch

from ilm_dist.train.health import NonFiniteLoss
from ilm_dist.train.run_dir import RunDir
from ilm_dist.train.selection import BestBackbone

CRITERION = {"metric": "val_loss", "split": "val", "views": "augmented", "max_samples": None}


def backbone(value: float) -> dict[str, torch.Tensor]:
    return {"conv1.weight": torch.full((2, 2), value)}


def written(out) -> tuple[dict, torch.Tensor]:
    record = json.loads((out / "best.json").read_text())
    weights = torch.load(out / "backbone_best.pt", weights_only=True)
    return record, weights["conv1.weight"]


def test_only_a_strictly_lower_finite_value_is_a_new_best(tmp_path):
    best = BestBackbone(RunDir(tmp_path), CRITERION, is_main=True)
    assert best.update(10, 0, 2.0, backbone(1.0))
    for value in (2.0, 3.0, math.nan, math.inf):
        assert not best.update(20, 1, value, backbone(9.0))
    assert best.update(30, 2, 1.5, backbone(3.0))
    record, weights = written(tmp_path)
    assert record == {**CRITERION, "step": 30, "epoch": 2, "value": 1.5, "backbone": "backbone_best.pt"}
    assert torch.equal(weights, torch.full((2, 2), 3.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "backbone_best.pt",
        "best.json",
    ]  # no temporary left


def test_the_kept_backbone_is_a_copy(tmp_path):
    best = BestBackbone(RunDir(tmp_path), CRITERION, is_main=True)
    weights = backbone(1.0)
    best.update(1, 0, 1.0, weights)
    weights["conv1.weight"].add_(5.0)  # training goes on updating the weights it shares on a CPU
    assert torch.equal(best.best_backbone()["conv1.weight"], torch.full((2, 2), 1.0))


def test_other_ranks_track_the_value_and_write_nothing(tmp_path):
    best = BestBackbone(RunDir(tmp_path), CRITERION, is_main=False)
    assert best.update(4, 0, 0.5, None)
    assert best.step == 4 and best.best_backbone() is None
    assert list(tmp_path.iterdir()) == []


def test_state_survives_a_checkpoint_and_rewrites_the_files(tmp_path):
    best = BestBackbone(RunDir(tmp_path / "a"), CRITERION, is_main=True)
    (tmp_path / "a").mkdir()
    best.update(6, 1, 0.7, backbone(2.0))
    resumed = BestBackbone(RunDir(tmp_path / "b"), CRITERION, is_main=True)
    (tmp_path / "b").mkdir()
    resumed.load_state_dict(best.state_dict())
    resumed.sync_files()
    record, weights = written(tmp_path / "b")
    assert record == {**CRITERION, "step": 6, "epoch": 1, "value": 0.7, "backbone": "backbone_best.pt"}
    assert torch.equal(weights, torch.full((2, 2), 2.0))


def test_a_resume_before_any_best_removes_later_files(tmp_path):
    (tmp_path / "best.json").write_text("{}")
    (tmp_path / "backbone_best.pt").write_bytes(b"later")
    resumed = BestBackbone(RunDir(tmp_path), CRITERION, is_main=True)
    resumed.load_state_dict(None)  # the checkpoint predates the first best
    resumed.sync_files()
    assert list(tmp_path.iterdir()) == []


def test_a_best_selected_by_another_criterion_starts_afresh(tmp_path):
    best = BestBackbone(RunDir(tmp_path), CRITERION, is_main=True)
    best.update(6, 1, 0.7, backbone(2.0))
    other = BestBackbone(RunDir(tmp_path), {**CRITERION, "metric": "val_moco"}, is_main=True)
    other.load_state_dict(best.state_dict())
    assert other.record() is None
    with pytest.raises(NonFiniteLoss, match="val_moco was never finite"):
        other.best_backbone()
