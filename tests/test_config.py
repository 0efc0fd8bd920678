"""Config loading: overrides, base chains, and error messages that name the key."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ilm_dist.config import (
    DATA_BACKENDS,
    ConfigError,
    absolute_overrides,
    load_config,
    read_yaml_mapping,
    save_config,
)
from ilm_dist.data import backend_factory
from ilm_dist.data.manifest import ManifestError, load_manifest
from ilm_dist.data.random_backend import RandomTensorLoader
from ilm_dist.data.sampling import GlobalBatch
from ilm_dist.train.engine import resolve_deepspeed_config
from ilm_dist.train.preflight import preflight
from ilm_dist.train.run_dir import RunDir
from ilm_dist.train.run_plan import training_plan
from tests.launcher import REPO

RUNS = Path("runs").resolve()  # configs/ name ../../runs: the repository's runs/


def write(path, text):
    path.write_text(text)
    return path


def test_exponent_floats_without_a_dot_are_floats():
    """YAML 1.1 reads 1e-4 as a string; a float-typed key takes it as the number."""
    cfg = load_config("configs/demo.yaml", ["optim.lr=1e-4", "optim.weight_decay=5E2"])
    assert (cfg.optim.lr, cfg.optim.weight_decay) == (1e-4, 500.0)
    with pytest.raises(ConfigError, match=r"optim\.lr: expected float, got '1e-4x'"):
        load_config("configs/demo.yaml", ["optim.lr=1e-4x"])


def test_dotted_overrides_are_typed():
    cfg = load_config(
        "configs/demo.yaml", ["train.max_steps=20", "output_dir=runs/x", "loss.weights=[1, 2, 3, 4]"]
    )
    assert cfg.train.max_steps == 20
    assert cfg.output_dir == str(Path.cwd() / "runs/x")  # an override's path: relative to the working dir
    assert cfg.loss.weights == [1.0, 2.0, 3.0, 4.0]
    assert all(isinstance(w, float) for w in cfg.loss.weights)


def test_base_chain_and_presets():
    official = load_config("configs/idc/moco.yaml")
    assert (official.moco.mlp, official.moco.temperature, official.optim.lr) == (False, 0.07, 0.03)
    assert (official.optim.momentum, official.optim.weight_decay) == (0.9, 1e-4)
    demo = load_config("configs/demo.yaml")
    assert (demo.moco.mlp, demo.moco.temperature, demo.optim.schedule) == (True, 0.2, "cosine")
    assert demo.model.arch == "resnet18"  # the file overrides its base


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.max_stpes=3", "unknown key 'train.max_stpes' (did you mean 'train.max_steps'?)"),
        ("trian.max_steps=3", "unknown key 'trian'"),
        ("train.max_steps=abc", "train.max_steps: expected int, got 'abc'"),
        ("moco.mlp=1", "moco.mlp: expected bool, got 1"),
        ("loss.type=cosine", "loss.type: 'cosine' is not one of ['none', 'mse', 'bt']"),
        ("loss.blocks=[1, 5]", "loss.blocks: [1, 5]: blocks are 1..4"),
        ("loss.weights=[0.1]", "loss.weights: has 1 values for 4 blocks [1, 2, 3, 4]"),
        ("moco.momentum=1.5", "moco.momentum: must be in [0, 1)"),
        ("aug.crop_scale=[0.9, 0.2]", "aug.crop_scale: [0.9, 0.2]: expected [min, max]"),
        ("data.batch_size=1", "data.batch_size: must be >= 2"),
        ("model.arch=vit_b_16", "model.arch: 'vit_b_16' is not a torchvision ResNet"),
        ("engine.deepspeed_config=nope.json", "engine.deepspeed_config: file not found"),
        ("data.shards=null", "data.shards: is required for data.backend='torch'"),
        ("data.backend=dalli", "data.backend: 'dalli' is not one of ['auto', 'torch', 'synthetic', 'dali']"),
        (
            "loss.plugins=[no_such_losses]",
            "loss.plugins: no module 'no_such_losses' on the Python path (install it, or add its folder to PYTHONPATH)",
        ),
        ("train", "override 'train': expected key=value"),
        (
            "moco={dim: 64, dim: 32}",
            "value is not valid YAML (line 1, column 11: key 'dim' given twice in one mapping (first on line 1))",
        ),
        (
            "name=..",
            "name: '..': letters, digits, '_', '.', '-' only, not '.' or '..', not starting with '-' (it names a folder)",
        ),
        ("name=runs/moco", "name: 'runs/moco': letters, digits"),
    ],
)
def test_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("configs/demo.yaml", [override])
    assert message in str(err.value)


def test_a_data_backend_is_a_name_in_the_registry(monkeypatch):
    """A backend added to DATA_BACKENDS is a data.backend value, and the loader built for it is its class."""
    monkeypatch.setitem(DATA_BACKENDS, "mine", "ilm_dist.data.random_backend:RandomTensorLoader")
    cfg = load_config("configs/demo.yaml", ["data.backend=mine"])
    assert cfg.data.backend == "mine" and backend_factory(cfg.data.backend) is RandomTensorLoader
    with pytest.raises(
        ConfigError,
        match=r"data\.backend: 'theirs' is not one of \['auto', 'torch', 'synthetic', 'dali', 'mine'\]",
    ):
        load_config("configs/demo.yaml", ["data.backend=theirs"])


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="circular 'base' chain"):
        load_config(write(tmp_path / "a.yaml", "base: a.yaml\n"))
    with pytest.raises(ConfigError, match=r"unknown key 'data\.shard'"):
        load_config(write(tmp_path / "b.yaml", "data:\n  shard: x\n"))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            ": : :\n",
            "x is not valid YAML (line 1, column 1: expected <block end>, but found ':', while parsing a block mapping)",
        ),
        ("a: 1\n b: 2\n", "x is not valid YAML (line 2, column 3: mapping values are not allowed here)"),
        (b"\xf6\x00\xff", "x is not a UTF-8 text file"),
        ("- 1\n- 2\n", "expected a mapping at the top level"),
        (None, "cannot read x (Is a directory)"),
        (
            "train:\n  ckpt_every: 2\n  keep_checkpoints: 3\ntrain:\n  max_steps: 7\n",
            "x is not valid YAML (line 4, column 1: key 'train' given twice in one mapping (first on line 1))",
        ),
        (
            "train:\n  max_steps: 5\n  max_steps: 7\n",
            "x is not valid YAML (line 3, column 3: key 'max_steps' given twice in one mapping (first on line 2))",
        ),
        (
            "aug: {hflip: true, hflip: false}\n",
            "x is not valid YAML (line 1, column 20: key 'hflip' given twice in one mapping (first on line 1))",
        ),
    ],
    ids=["parser", "scanner", "binary", "a list", "a directory", "two blocks", "a nested key", "flow style"],
)
def test_a_yaml_file_that_cannot_be_read_is_one_line(tmp_path, content, message):
    path = tmp_path / "c.yaml"
    if content is None:
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(ConfigError) as err:
        read_yaml_mapping(path, "x")
    assert str(err.value) == f"{path}: {message}"
    assert read_yaml_mapping(write(tmp_path / "empty.yaml", ""), "x") == {}


def test_yaml_merge_keys_still_merge_and_python_tags_are_still_refused(tmp_path):
    text = "a: &a {x: 1, y: 2}\nb:\n  <<: *a\n  y: 3\n"  # a merged key overridden is not a key twice
    assert read_yaml_mapping(write(tmp_path / "m.yaml", text), "x") == {
        "a": {"x": 1, "y": 2},
        "b": {"x": 1, "y": 3},
    }
    with pytest.raises(
        ConfigError, match=r"could not determine a constructor for the tag 'tag:yaml\.org,2002:python"
    ):
        read_yaml_mapping(write(tmp_path / "p.yaml", "a: !!python/object/apply:os.system [ls]\n"), "x")


def test_a_key_twice_in_a_base_file_is_named_in_that_file(tmp_path):
    """The issue's case: a second ``data:`` block without ``shards`` fell back to the base config's."""
    base = write(
        tmp_path / "base.yaml",
        f"base: {REPO}/configs/demo.yaml\ndata:\n  shards: /mine\ndata:\n  batch_size: 8\n",
    )
    run = write(tmp_path / "run.yaml", "base: base.yaml\ntrain:\n  max_steps: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(run)
    assert str(err.value) == (
        f"{base}: the config file is not valid YAML (line 4, column 1: key 'data' given twice in one mapping "
        "(first on line 2))"
    )


def test_pretraining_refuses_a_config_with_two_train_blocks_before_any_work(tmp_path):
    config = write(
        tmp_path / "run.yaml",
        f"base: {REPO}/configs/demo.yaml\ntrain:\n  ckpt_every: 2\n  keep_checkpoints: 3\ntrain:\n  max_steps: 7\n",
    )
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "launch/pretrain.py",
        "--config",
        str(config),
        "data.backend=synthetic",
        f"output_dir={out}",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert (proc.returncode, proc.stdout) == (2, ""), proc.stderr[-3000:]
    assert proc.stderr == (
        f"error: {config}: the config file is not valid YAML (line 5, column 1: key 'train' given twice in one "
        "mapping (first on line 2))\n"
    )
    assert not out.exists()


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"\xf6\x00\xff", "is not a UTF-8 text file"),
        (
            b"seeds: [0]\nseeds: [1]\n",
            "is not valid YAML (line 2, column 1: key 'seeds' given twice in one mapping (first on line 1))",
        ),
    ],
    ids=["binary", "a key twice"],
)
@pytest.mark.parametrize("command", ["pretrain", "tune", "experiment"])
def test_every_command_names_its_unreadable_file_in_one_line(tmp_path, capsys, command, content, problem):
    from ilm_dist.experiment.command import experiment_main
    from ilm_dist.pretrain import pretrain_main
    from ilm_dist.tune.command import tune_main

    main, what = {
        "pretrain": (pretrain_main, "the config file"),
        "tune": (tune_main, "the sweep file"),
        "experiment": (experiment_main, "the experiment file"),
    }[command]
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    with pytest.raises(SystemExit) as exit_:
        main(["--config", str(path)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"error: {path}: {what} {problem}\n"


def test_missing_shards_fail_before_training(tmp_path):
    with pytest.raises(ManifestError, match=r"manifest\.json: not found"):
        preflight("configs/demo.yaml", [f"data.shards={tmp_path}"])


def test_deepspeed_json_may_not_set_batch(tmp_path):
    ds = write(tmp_path / "ds.json", json.dumps({"train_batch_size": 64}))
    cfg = load_config("configs/demo.yaml", [f"engine.deepspeed_config={ds}"])
    with pytest.raises(ConfigError, match="sets 'train_batch_size'"):
        resolve_deepspeed_config(cfg.engine.deepspeed_config, cfg.data.batch_size)
    cfg = load_config("configs/demo.yaml", ["data.batch_size=48"])
    resolved = resolve_deepspeed_config(cfg.engine.deepspeed_config, cfg.data.batch_size)
    assert resolved["train_micro_batch_size_per_gpu"] == 48


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"bf16": ', "not valid JSON (Expecting value: line 1 column 10 (char 9))"),
        (b"\xf6\x00\xff", "not valid JSON ('utf-8' codec can't decode byte 0xf6 in position 0"),
        (b"[1, 2]", "holds list, expected a JSON object"),
        (b'{"bf16": {}, "bf16": {"enabled": true}}', "not valid JSON (key 'bf16' given twice in one object)"),
        (
            b'{"zero_optimization": {"stage": 0, "stage": 3}}',
            "not valid JSON (key 'zero_optimization.stage' given twice in one object)",
        ),
    ],
    ids=["truncated", "binary", "a list", "a key twice", "a nested key twice"],
)
def test_an_unreadable_json_file_is_one_line_naming_it(tmp_path, content, message):
    (tmp_path / "manifest.json").write_bytes(content)
    with pytest.raises(ConfigError) as err:
        resolve_deepspeed_config(str(tmp_path / "manifest.json"), 8)
    assert str(err.value).startswith(f"engine.deepspeed_config: {tmp_path}/manifest.json: {message}")
    with pytest.raises(ManifestError) as err:
        load_manifest(tmp_path)
    assert str(err.value).startswith(f"{tmp_path}/manifest.json: {message}")


def test_relative_paths_are_relative_to_the_file_that_names_them(tmp_path, monkeypatch):
    (tmp_path / "presets").mkdir()
    write(tmp_path / "presets" / "ds.json", "{}")
    write(tmp_path / "presets" / "base.yaml", "engine:\n  deepspeed_config: ds.json\noutput_dir: ../runs/a\n")
    run = write(tmp_path / "run.yaml", "base: presets/base.yaml\ndata:\n  shards: data/packed\n")
    monkeypatch.chdir(tmp_path / "presets")  # the working directory plays no part for file values
    cfg = load_config(run, ["data.backend=synthetic"])
    assert cfg.engine.deepspeed_config == str(tmp_path / "presets" / "ds.json")
    assert cfg.output_dir == str(tmp_path / "runs" / "a")
    assert cfg.data.shards == str(tmp_path / "data" / "packed")
    assert load_config(run, ["data.shards=here", "data.backend=synthetic"]).data.shards == str(
        tmp_path / "presets" / "here"
    )
    save_config(
        cfg, tmp_path / "elsewhere.yaml"
    )  # a saved config holds absolute paths: same meaning anywhere
    monkeypatch.chdir(tmp_path)
    assert load_config(tmp_path / "elsewhere.yaml") == cfg
    assert absolute_overrides(["data.shards=x", "seed=3"], tmp_path) == [
        f"data.shards={tmp_path / 'x'}",
        "seed=3",
    ]


def plan_line(cfg, steps_per_epoch: int, world: int, accum: int) -> str:
    """The plan line of ``cfg`` on ``world`` ranks with ``accum`` accumulation steps."""
    batch = GlobalBatch(cfg.data.batch_size, world, accum)
    return training_plan(cfg.train, cfg.optim, cfg.val, RunDir(cfg.output_dir), batch, steps_per_epoch)


def test_training_plan_line_states_length_batch_lr_and_what_is_saved():
    nih = load_config(
        "configs/nih/moco_bt.yaml", ["data.batch_size=16", "train.epochs=200", "train.ckpt_every=5000"]
    )
    assert plan_line(nih, steps_per_epoch=100, world=4, accum=2) == (
        "plan: 20000 steps = 200 x 100 steps/epoch (train.epochs); global batch 128 = 16/rank x 4 ranks x "
        "2 accumulation; lr 0.03 (sgd, constant); checkpoints every 5000 steps and at the end, the last 2 "
        f"kept, in {RUNS}/nih/moco_bt/checkpoints; validation loss every 5000 steps and at the last on all "
        f"samples of split 'val' (eval views), the lowest val_loss's backbone in {RUNS}/nih/moco_bt/backbone_best.pt; "
        f"{RUNS}/nih/moco_bt/backbone.pt: that best backbone (train.export=best), backbone_last.pt the last"
    )
    demo = load_config("configs/demo.yaml", ["train.max_steps=25", "train.ckpt_every=0"])
    line = plan_line(demo, steps_per_epoch=50, world=2, accum=1)
    assert line.startswith(
        "plan: 25 steps (train.max_steps; 0.5 x 50 steps/epoch); global batch 64 = 32/rank"
    )
    assert (
        "lr 0.3 (sgd, 1.2 x 64/256, cosine, 10 warm-up steps); checkpoints at the end, the last 2 kept"
        in line
    )
    assert line.endswith("runs/demo/pretrain/backbone.pt: the last step's backbone")


def test_every_dataset_config_states_its_length():
    """No dataset config falls back to the dataclass default of one epoch."""
    paths = [p for d in ("nih", "idc", "dr") for p in sorted(Path("configs", d).glob("moco*.yaml"))]
    assert len(paths) == 9
    for path in paths:
        cfg = load_config(path)
        assert cfg.train.max_steps is None and cfg.train.epochs == 200, path
