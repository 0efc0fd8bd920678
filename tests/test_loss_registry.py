"""A new intermediate loss needs its own module and a config file only: this file registers a toy loss,
trains two steps with it from a run config, and finds it in the config round trip and the sweep results."""

from dataclasses import dataclass

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from ilm_dist import distributed as D
from ilm_dist.config import ConfigError, load_config, save_config
from ilm_dist.losses import INTERMEDIATE_LOSSES, IntermediateLoss, register_intermediate_loss
from ilm_dist.train.trainer import Trainer
from ilm_dist.tune import results
from ilm_dist.tune.spec import Sweep, SweepSettings
from tests.launcher import REPO, read_metrics


@dataclass
class ToyLossConfig:
    gain: float = 1.0

    def check(self) -> None:
        if self.gain <= 0:
            raise ConfigError("loss.toy.gain: must be positive")


class ToyLoss(IntermediateLoss):
    """``gain`` times the MSE of globally pooled block outputs."""

    name = "toy"
    Config = ToyLossConfig

    def reduce(self, blocks: list[Tensor]) -> list[Tensor]:
        return [blocks[b - 1].mean(dim=(2, 3)) for b in self.blocks]

    def forward(self, q_reduced: list[Tensor], k_reduced: list[Tensor]) -> Tensor:
        losses = torch.stack(
            [F.mse_loss(q.float(), k.float()) for q, k in zip(q_reduced, k_reduced, strict=True)]
        )
        return self.options.gain * self.weights * losses


@pytest.fixture(autouse=True)
def toy_registered():
    """Register the toy loss for this file's tests only (other tests see the built-in types)."""
    register_intermediate_loss(ToyLoss)
    yield
    del INTERMEDIATE_LOSSES[ToyLoss.name]


TOY = [
    "loss.type=toy",
    "loss.blocks=[2, 4]",
    "loss.weights=[0.5, 1.0]",
    "loss.toy.gain=3.0",
    "data.backend=synthetic",
    "data.image_size=32",
    "data.batch_size=8",
    "data.synthetic.num_samples=64",
    "moco.queue_size=32",
    "train.max_steps=2",
    "train.log_every=1",
]


def test_the_toy_loss_is_a_config_value_with_its_own_section(tmp_path):
    cfg = load_config(REPO / "configs/demo.yaml", TOY)
    assert isinstance(cfg.loss.toy, ToyLossConfig) and cfg.loss.toy.gain == 3.0
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml").loss.toy == ToyLossConfig(3.0)
    with pytest.raises(ConfigError, match=r"loss\.toy\.gain: must be positive"):
        load_config(REPO / "configs/demo.yaml", [*TOY, "loss.toy.gain=0"])
    with pytest.raises(ConfigError, match=r"unknown key 'loss.toy.gian' \(did you mean 'loss.toy.gain'\?\)"):
        load_config(REPO / "configs/demo.yaml", [*TOY, "loss.toy.gian=1"])
    assert list(INTERMEDIATE_LOSSES)[-1] == "toy"


@pytest.fixture
def toy_run(tmp_path):
    cfg = load_config(REPO / "configs/demo.yaml", [*TOY, f"output_dir={tmp_path / 'run'}"])
    try:
        trainer = Trainer(cfg)
        trainer.fit()
    finally:
        D.shutdown()
    return cfg, tmp_path / "run"


def test_trains_two_steps_and_appears_in_the_sweep_results(toy_run, tmp_path):
    cfg, run = toy_run
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert r["toy_block2"] > 0 and r["toy_block4"] > 0
        assert r["loss"] == pytest.approx(r["moco"] + r["toy_block2"] + r["toy_block4"], rel=1e-5)

    settings = SweepSettings(name="toy", output_dir=str(tmp_path / "sweep"), metric="knn_acc_block4")
    sweep = Sweep(settings, space=None, base_config=None, base=None)
    history = pd.DataFrame({"step": [2], "knn_acc_block4": [0.5]})
    trial = results.TrialRecord("t0", "completed", {"loss.type": "toy"}, cfg, history, "")
    table = results.table([trial], sweep)
    assert table.loc[0, "loss.type"] == "toy" and table.loc[0, "layers"] == "2,4"
    shown = results.plot(table, sweep, tmp_path / "results.png")
    assert "toy" in shown and (tmp_path / "results.png").stat().st_size > 0
