"""A new intermediate loss needs its own module and a config naming it in ``loss.plugins``: a toy loss in a
module outside the package (a folder on PYTHONPATH) becomes a config value with its own section, trains two
steps through ``launch/pretrain.py`` in a subprocess as a sweep trial's config, and appears in the sweep's
results table and plot."""

import os
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from ilm_dist.config import ConfigError, load_config, save_config
from ilm_dist.losses import INTERMEDIATE_LOSSES
from ilm_dist.tune import results
from ilm_dist.tune.spec import load_sweep
from ilm_dist.tune.trial import MetricsFollower
from tests.launcher import REPO, read_metrics

DEMO = REPO / "configs/demo.yaml"

TOY_MODULE = '''
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ilm_dist.errors import ConfigError
from ilm_dist.losses import IntermediateLoss, register_intermediate_loss


@dataclass
class ToyLossConfig:
    gain: float = 1.0

    def check(self):
        if self.gain <= 0:
            raise ConfigError("loss.toy.gain: must be positive")


@register_intermediate_loss
class ToyLoss(IntermediateLoss):
    """gain times the MSE of globally pooled block outputs."""

    name = "toy"
    Config = ToyLossConfig

    def reduce(self, blocks):
        return [blocks[b - 1].mean(dim=(2, 3)) for b in self.blocks]

    def forward(self, q_reduced, k_reduced):
        losses = torch.stack([F.mse_loss(q.float(), k.float()) for q, k in zip(q_reduced, k_reduced)])
        return self.options.gain * self.weights * losses
'''

# the mistake of forgetting the decorator: a loss class that is never registered
UNREGISTERED_MODULE = """
from ilm_dist.losses import IntermediateLoss


class Forgotten(IntermediateLoss):
    name = "forgotten"
"""

TOY = ["loss.plugins=[toy_loss]", "loss.type=toy", "loss.blocks=[2, 4]", "loss.weights=[0.5, 1.0]"]


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    """A folder outside the package holding toy_loss.py, on this process's path; afterwards the toy loss is
    unregistered and its module forgotten (other tests see the built-in types)."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "toy_loss.py").write_text(TOY_MODULE)
    (folder / "unregistered.py").write_text(UNREGISTERED_MODULE)
    monkeypatch.syspath_prepend(str(folder))
    yield folder
    INTERMEDIATE_LOSSES.pop("toy", None)
    for module in ("toy_loss", "unregistered"):
        sys.modules.pop(module, None)


def test_the_toy_loss_is_a_config_value_once_its_module_is_named(plugins, tmp_path):
    with pytest.raises(ConfigError, match=r"loss\.type: 'toy' is not one of \['none', 'mse', 'bt'\]"):
        load_config(DEMO, TOY[1:])
    cfg = load_config(DEMO, [*TOY, "loss.toy.gain=3.0"])
    assert type(cfg.loss.toy).__name__ == "ToyLossConfig" and cfg.loss.toy.gain == 3.0
    assert list(INTERMEDIATE_LOSSES)[-1] == "toy"
    save_config(cfg, tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["loss"]["plugins"] == ["toy_loss"]
    assert load_config(tmp_path / "config.yaml").loss == cfg.loss
    with pytest.raises(ConfigError, match=r"loss\.toy\.gain: must be positive"):
        load_config(DEMO, [*TOY, "loss.toy.gain=0"])
    with pytest.raises(ConfigError, match=r"unknown key 'loss.toy.gian' \(did you mean 'loss.toy.gain'\?\)"):
        load_config(DEMO, [*TOY, "loss.toy.gian=1"])


@pytest.mark.parametrize(
    ("plugin", "message"),
    [
        (
            "[no_such_losses]",
            "loss.plugins: no module 'no_such_losses' on the Python path (install it, or add its folder to PYTHONPATH)",
        ),
        (
            "[unregistered]",
            "loss.plugins: module 'unregistered' registers no intermediate loss (define a subclass of "
            "IntermediateLoss decorated with @register_intermediate_loss)",
        ),
        ("[plugins/toy_loss]", "loss.plugins: 'plugins/toy_loss' is not a module name"),
        ("toy_loss", "loss.plugins: expected a list, got 'toy_loss'"),
    ],
)
def test_plugin_errors_name_the_key_and_the_value(plugins, plugin, message):
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, [f"loss.plugins={plugin}"])
    assert message in str(err.value)


MONITORED = [
    "model.arch=resnet18",
    "data.image_size=32",
    "data.batch_size=8",
    "data.num_workers=0",
    "moco.queue_size=32",
    "train.max_steps=2",
    "train.log_every=1",
    "train.ckpt_every=0",
    "monitor.every=2",
    "monitor.max_bank=64",
    "monitor.max_val=32",
    f"engine.deepspeed_config={REPO / 'configs/deepspeed/fp32.json'}",
]


@pytest.mark.slow  # whole commands: pretraining runs as child processes
def test_trains_through_the_command_and_appears_in_the_sweep_results(plugins, tmp_path, packed_tiny):
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(
        yaml.safe_dump(
            {
                "name": "toy",
                "output_dir": str(tmp_path / "out"),
                "base": {"config": str(DEMO), "overrides": [f"data.shards={packed_tiny}", *MONITORED, *TOY]},
                "space": {"loss.type": {"grid": ["mse", "toy"]}, "loss.toy.gain": {"uniform": [1.0, 4.0]}},
            }
        )
    )
    sweep = load_sweep(sweep_file)  # the space's keys and values are checked against the toy loss's section
    sampled = {"loss.type": "toy", "loss.toy.gain": 3.0}
    run = sweep.trials_dir / "t0"
    run.mkdir(parents=True)
    save_config(sweep.run_config(sampled, run, "toy_t0"), run / "run.yaml")  # as a trial does

    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(plugins), os.environ.get("PYTHONPATH")])),
    }
    cmd = [sys.executable, "launch/pretrain.py", "--config", str(run / "run.yaml")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert r["toy_block2"] > 0 and r["toy_block4"] > 0
        assert r["loss"] == pytest.approx(r["moco"] + r["toy_block2"] + r["toy_block4"], rel=1e-5)

    history = pd.DataFrame(MetricsFollower(run / "metrics.jsonl").poll())  # what the trial reports to Tune
    trial = results.TrialRecord(
        "t0", "completed", sampled, sweep.run_config(sampled, run, "toy_t0"), history, ""
    )
    table = results.table([trial], sweep)
    row = table.iloc[0]
    assert (row["loss.type"], row["loss.toy.gain"], row["layers"], row["steps"]) == ("toy", "3", "2,4", 2)
    assert 0 <= row["best_knn_acc_block4"] <= 1
    assert results.plot(table, sweep, tmp_path / "results.png") == ["toy"]
