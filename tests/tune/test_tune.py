"""Ray Tune sweeps: the sweep file and search-space checks before Ray starts (the sweep itself:
tests/integration/test_tune_sweep.py)."""

import numpy as np
import pytest
import yaml

from ilm_dist.config import ConfigError, format_overrides, load_config
from ilm_dist.tune.command import tune_main
from ilm_dist.tune.space import parse_space
from ilm_dist.tune.spec import load_sweep
from tests.launcher import REPO

DEMO = REPO / "configs" / "demo.yaml"
TINY = [
    "model.arch=resnet18",
    "data.image_size=32",
    "data.batch_size=8",
    "data.num_workers=0",
    "moco.queue_size=32",
    "train.max_steps=6",
    "train.log_every=1",
    "train.ckpt_every=0",
    "monitor.every=2",
    "monitor.max_bank=64",
    "monitor.max_val=32",
    "loss.bt.proj_dims=[64,64]",
    f"engine.deepspeed_config={REPO / 'configs/deepspeed/fp32.json'}",
]


def space_of(raw, *base_overrides):
    """Parse ``raw`` against configs/demo.yaml with ``base_overrides`` (no data needed)."""
    fixed = [*TINY, *base_overrides]
    base = load_config(DEMO, fixed)
    return parse_space(raw, base, lambda values: load_config(DEMO, [*fixed, *format_overrides(values)]))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"loss.typo": {"choice": [1]}},
            "space.loss.typo: unknown key 'loss.typo' (did you mean 'loss.type'?)",
        ),
        ({"optim.lrr": {"choice": [0.1]}}, "did you mean 'optim.lr'?"),
        ({"loss.mse": {"choice": [{}]}}, "space.loss.mse: is a section; sweep its fields"),
        ({"loss.type.x": {"choice": [1]}}, "space.loss.type.x: 'loss.type' is not a section"),
        ({"output_dir": {"choice": ["a"]}}, "space.output_dir: set by the sweep"),
        ({"optim.lr": {"choice": []}}, "space.optim.lr: empty choice"),
        ({"optim.lr": {"grid": []}}, "space.optim.lr: empty grid"),
        ({"optim.lr": {"uniform": [0.3, 0.1]}}, "space.optim.lr: uniform needs low < high, got [0.3, 0.1]"),
        ({"optim.lr": {"uniform": [0.1, 0.1]}}, "space.optim.lr: uniform needs low < high"),
        ({"optim.lr": {"loguniform": [0.0, 0.1]}}, "space.optim.lr: loguniform needs low > 0, got 0.0"),
        ({"optim.lr": {"loguniform": [0.1]}}, "space.optim.lr: loguniform needs [low, high] (numbers)"),
        (
            {"moco.queue_size": {"randint": [16, 64.5]}},
            "space.moco.queue_size: randint needs [low, high] (integers)",
        ),
        ({"optim.lr": {"normal": [0, 1]}}, "space.optim.lr: expected one of {choice: ..., grid: ..."),
        ({"optim.lr": 0.1}, "space.optim.lr: expected one of"),
        ({"optim.lr": {"uniform": [-0.1, 0.1]}}, "space.optim.lr=-0.1: optim.lr: must be positive"),
        ({"loss.type": {"choice": ["mse", "mae"]}}, "space.loss.type='mae': loss.type: 'mae' is not one of"),
        (
            {"moco.queue_size": {"choice": [32, "big"]}},
            "space.moco.queue_size='big': moco.queue_size: expected int",
        ),
        (
            {"loss.blocks": {"choice": [[4], [4, 5]]}},
            "space.loss.blocks=[4, 5]: loss.blocks: [4, 5]: blocks are 1..4",
        ),
        ({"loss.weights.block5": {"uniform": [0, 1]}}, "space.loss.weights.block5: per-block weights are"),
        (
            {"loss.weights.block1": {"uniform": [-1, 1]}},
            "space.loss.weights.block1=-1: loss.weights: must be >= 0",
        ),
        ({}, "space: expected a non-empty mapping"),
    ],
)
def test_space_errors_name_the_key(raw, message):
    with pytest.raises(ConfigError) as err:
        space_of(raw)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("raw", "base", "message"),
    [
        (  # a weight list cannot follow a sampled layer subset
            {"loss.blocks": {"choice": [[4], [3, 4]]}, "loss.weights": {"choice": [[0.1, 0.2]]}},
            [],
            "space.loss.weights: [0.1, 0.2] does not have one weight per block of loss.blocks [4]",
        ),
        (
            {"loss.weights": {"choice": [[0.1, 0.2]]}},
            [],
            "space.loss.weights=[0.1, 0.2]: loss.weights: has 2 values for 4 blocks [1, 2, 3, 4]",
        ),
        (
            {"loss.weights": {"choice": [[0.1]]}, "loss.weights.block4": {"uniform": [0, 1]}},
            ["loss.blocks=[4]", "loss.weights=[0.5]"],
            "give either loss.weights or loss.weights.block<b>, not both",
        ),
        (  # block 1 has no weight: neither in the base nor in the space
            {"loss.blocks": {"choice": [[3, 4], [1, 4]]}},
            ["loss.blocks=[3,4]", "loss.weights=[0.5,0.5]"],
            "space.loss.blocks: [1, 4] needs a weight for block 1: add loss.weights.block1 to the space",
        ),
        (
            {"loss.weights.block1": {"loguniform": [0.01, 1.0]}},
            ["loss.blocks=[3,4]", "loss.weights=[0.5,0.5]"],
            "space.loss.weights.block1: block 1 is never in loss.blocks [[3, 4]]",
        ),
    ],
)
def test_blocks_and_weights_must_pair(raw, base, message):
    with pytest.raises(ConfigError) as err:
        space_of(raw, *base)
    assert message in str(err.value)


def test_block_weights_follow_the_sampled_subset():
    space = space_of(
        {
            "loss.blocks": {"choice": [[4], [2, 4]]},
            "loss.weights.block2": {"loguniform": [0.01, 1.0]},
            "loss.weights.block4": {"loguniform": [0.01, 1.0]},
            "moco.queue_size": {"randint": [16, 64]},
        }
    )
    sample = {
        "loss.blocks": [2, 4],
        "loss.weights.block2": np.float64(0.1),
        "loss.weights.block4": 0.7,
        "moco.queue_size": np.int64(20),
    }
    assert space.overrides(sample) == {
        "loss.blocks": [2, 4],
        "moco.queue_size": 20,
        "loss.weights": [0.1, 0.7],
    }
    assert space.overrides({**sample, "loss.blocks": [4]})["loss.weights"] == [0.7]
    # a per-block weight alone applies to the base's blocks; the base's other weights stay
    only4 = space_of({"loss.weights.block4": {"uniform": [0.0, 1.0]}})
    assert only4.overrides({"loss.weights.block4": 0.9})["loss.weights"] == [0.25, 0.25, 0.25, 0.9]
    assert only4.to_tune().keys() == {"loss.weights.block4"}


def test_overrides_round_trip_through_load_config():
    values = {"optim.lr": 1e-5, "loss.type": "none", "loss.blocks": [3, 4], "loss.weights": [5e-05, 0.5]}
    cfg = load_config(DEMO, [*TINY, *format_overrides(values)])
    assert (cfg.optim.lr, cfg.loss.type, cfg.loss.blocks, cfg.loss.weights) == (
        1e-5,
        "none",
        [3, 4],
        [5e-5, 0.5],
    )


def write_sweep(path, shards, space, **settings):
    sweep = {
        "name": "t",
        "output_dir": str(path.parent / "out"),
        "base": {"config": str(DEMO), "overrides": [f"data.shards={shards}", *TINY]},
        "num_samples": 1,
        "max_concurrent": 2,
        "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
        "space": space,
        **settings,
    }
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"schedular": {}}, "unknown key 'schedular' (did you mean 'scheduler'?)"),
        ({"metric": "knn_acc_block5"}, "metric: 'knn_acc_block5' is not reported for this data"),
        ({"metric": "knn_auc_block4"}, "metric: 'knn_auc_block4' is not reported"),  # a single-label set
        ({"num_samples": 0}, "num_samples: must be >= 1"),
        ({"name": ".."}, "name: '..': letters, digits, '_', '.', '-' only, not '.' or '..'"),
        ({"scheduler": {"reduction_factor": 1}}, "scheduler.reduction_factor: must be > 1"),
        ({"resources": {"gpus": 2, "ranks": 1}}, "resources.ranks: with GPUs, one rank per GPU"),
        ({"resources": {"gpus": 1.5}}, "resources.gpus: a whole number, or a fraction < 1"),
        ({"base": {"config": "nowhere.yaml"}}, "base: config file not found"),
        (
            {"base": {"config": str(DEMO), "overrides": ["data.shards=/nowhere"]}},
            "base: /nowhere/manifest.json",
        ),
    ],
)
def test_sweep_settings_errors(tmp_path, packed_tiny, settings, message):
    path = write_sweep(
        tmp_path / "sweep.yaml", packed_tiny, {"optim.lr": {"loguniform": [0.01, 0.1]}}, **settings
    )
    with pytest.raises(ConfigError) as err:
        load_sweep(path)
    assert message in str(err.value)


def test_the_metric_needs_the_monitor(tmp_path, packed_tiny):
    path = write_sweep(tmp_path / "sweep.yaml", packed_tiny, {"optim.lr": {"loguniform": [0.01, 0.1]}})
    with pytest.raises(ConfigError, match=r"monitor\.every: the sweep's metric comes from the kNN monitor"):
        load_sweep(path, ["monitor.every=0"])


def test_cli_reports_space_errors_before_ray(tmp_path, packed_tiny, capsys):
    path = write_sweep(tmp_path / "sweep.yaml", packed_tiny, {"optim.lr": {"loguniform": [-1, 0.1]}})
    with pytest.raises(SystemExit) as exit_info:
        tune_main(["--config", str(path)])
    assert exit_info.value.code == 2
    assert "error: space.optim.lr: loguniform needs low > 0, got -1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_file_as_output_dir_before_ray(tmp_path, packed_tiny, capsys):
    (tmp_path / "f").touch()
    space = {"optim.lr": {"loguniform": [0.01, 0.1]}}
    path = write_sweep(tmp_path / "sweep.yaml", packed_tiny, space, output_dir=str(tmp_path / "f"))
    with pytest.raises(SystemExit) as exit_info:
        tune_main(["--config", str(path)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: output_dir {tmp_path}/f: exists and is not a directory\n"


def test_shipped_sweeps_parse(packed_tiny):
    for name in ("demo", "idc"):
        sweep = load_sweep(REPO / "configs" / "sweeps" / f"{name}.yaml", [f"data.shards={packed_tiny}"])
        assert sweep.settings.scheduler.type == "asha" and sweep.max_t >= 2
        assert {"loss.type", "loss.blocks", "loss.weights.block1"} <= {p.key for p in sweep.space.params}


# --------------------------------------------------------------------------- a real sweep
