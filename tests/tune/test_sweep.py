"""ilm_dist.tune.sweep: what the sweep asks of Ray Tune, with the Tune classes that would start or schedule
trials replaced by recorders (no Ray starts): the search, scheduler, run config and resources from the
sweep's settings, and a new experiment vs a restored one."""

from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import pytest

from ilm_dist.config import load_config
from ilm_dist.processes import ResourcesConfig
from ilm_dist.tune import sweep as sweep_module
from ilm_dist.tune.space import parse_space
from ilm_dist.tune.spec import SchedulerConfig, Sweep, SweepSettings
from ilm_dist.tune.trial import run_trial
from tests.launcher import REPO

tune = pytest.importorskip("ray.tune")

DEMO = REPO / "configs" / "demo.yaml"
BASE = ["model.arch=resnet18", "data.image_size=32", "train.max_steps=12", "monitor.every=3"]
SPACE = {"optim.lr": {"loguniform": [0.01, 0.1]}, "loss.type": {"grid": ["none", "mse"]}}


def make_sweep(tmp_path: Path, **settings) -> Sweep:
    """A sweep over SPACE on configs/demo.yaml (no packed data: nothing here reads it)."""
    base = load_config(DEMO, BASE)
    space = parse_space(SPACE, base, lambda values: None)
    s = SweepSettings(name="t", output_dir=str(tmp_path / "out"), metric="loss", mode="min", **settings)
    return Sweep(s, space, DEMO, base)


class Recorder:
    """Stands in for a Tune class: records the arguments it was made with."""

    made: ClassVar[list] = []

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs
        type(self).made.append(self)


def recorder(name: str) -> type[Recorder]:
    return type(name, (Recorder,), {"made": []})


@pytest.fixture
def recorded(monkeypatch):
    """The scheduler and search classes the sweep builds, as recorders."""
    from ray.tune import schedulers
    from ray.tune.search import basic_variant

    classes = SimpleNamespace(
        asha=recorder("ASHA"), fifo=recorder("FIFO"), search=recorder("BasicVariantGenerator")
    )
    monkeypatch.setattr(schedulers, "ASHAScheduler", classes.asha)
    monkeypatch.setattr(schedulers, "FIFOScheduler", classes.fifo)
    monkeypatch.setattr(basic_variant, "BasicVariantGenerator", classes.search)
    return classes


def test_tune_config_from_the_settings(tmp_path, recorded):
    sweep = make_sweep(tmp_path, num_samples=5, max_concurrent=3, seed=11)
    config = sweep_module._tune_config(sweep)
    assert (config.metric, config.mode, config.num_samples) == ("loss", "min", 5)
    (search,) = recorded.search.made
    assert config.search_alg is search and search.kwargs == {"random_state": 11, "max_concurrent": 3}
    assert config.trial_dirname_creator(SimpleNamespace(trial_id="abc_00003")) == "abc_00003"


@pytest.mark.parametrize(("max_t", "expected"), [(None, 12 // 3), (7, 7)])
def test_asha_stops_trials_from_the_grace_period_up_to_max_t_but_never_at_it(
    tmp_path, recorded, max_t, expected
):
    scheduler = SchedulerConfig(type="asha", grace_period=2, reduction_factor=3.0, max_t=max_t)
    made = sweep_module._scheduler(make_sweep(tmp_path, scheduler=scheduler))
    assert recorded.asha.made == [made] and recorded.fifo.made == []
    assert made.kwargs == {
        "max_t": expected,
        "grace_period": 2,
        "reduction_factor": 3.0,
        "stop_last_trials": False,
    }


def test_fifo_runs_every_trial_to_its_end(tmp_path, recorded):
    made = sweep_module._scheduler(make_sweep(tmp_path, scheduler=SchedulerConfig(type="fifo")))
    assert recorded.fifo.made == [made] and made.kwargs == {} and recorded.asha.made == []


def test_run_config_keeps_failed_trials_going(tmp_path):
    config = sweep_module._run_config(make_sweep(tmp_path))
    assert config.name == "tune" and config.storage_path == str(tmp_path / "out")
    assert config.failure_config.fail_fast is False and config.failure_config.max_failures == 0


@pytest.fixture
def tuner(monkeypatch):
    """Records what run_sweep hands to tune: the wrapped trainable, the Tuner made or restored, fit()."""
    calls = SimpleNamespace(restorable=False, made=[], restored=[], fitted=0)

    class FakeTuner:
        def __init__(self, trainable, **kwargs):
            calls.made.append((trainable, kwargs))

        @classmethod
        def can_restore(cls, path):
            calls.asked = path
            return calls.restorable

        @classmethod
        def restore(cls, path, **kwargs):
            calls.restored.append((path, kwargs))
            return cls.__new__(cls)

        def fit(self):
            calls.fitted += 1

    monkeypatch.setattr(tune, "Tuner", FakeTuner)
    monkeypatch.setattr(tune, "with_parameters", lambda fn, **kw: ("with_parameters", fn, kw))
    monkeypatch.setattr(tune, "with_resources", lambda fn, res: ("with_resources", fn, res))
    return calls


def test_a_new_sweep_runs_the_trial_function_with_its_resources_and_space(tmp_path, tuner, recorded):
    sweep = make_sweep(tmp_path, resources=ResourcesConfig(cpus=2.0, gpus=0.5))
    sweep_module.run_sweep(sweep)
    ((trainable, kwargs),) = tuner.made
    assert trainable == (
        "with_resources",
        ("with_parameters", run_trial, {"sweep": sweep}),
        {"cpu": 2.0, "gpu": 0.5},
    )
    assert set(kwargs) == {"param_space", "tune_config", "run_config"}
    assert set(kwargs["param_space"]) == {"optim.lr", "loss.type"}
    assert kwargs["param_space"]["loss.type"] == {"grid_search": ["none", "mse"]}
    assert kwargs["run_config"].storage_path == str(tmp_path / "out")
    assert tuner.fitted == 1 and tuner.restored == []


@pytest.mark.parametrize("retry", [False, True])
def test_resume_restores_the_saved_experiment(tmp_path, tuner, retry):
    tuner.restorable = True
    sweep_module.run_sweep(make_sweep(tmp_path), resume=True, retry_errored=retry)
    assert tuner.asked == tmp_path / "out" / "tune"
    ((path, kwargs),) = tuner.restored
    assert path == str(tmp_path / "out" / "tune") and kwargs["restart_errored"] is retry
    assert tuner.made == [] and tuner.fitted == 1


def test_resume_without_a_saved_experiment_starts_a_new_one(tmp_path, tuner, recorded):
    sweep_module.run_sweep(make_sweep(tmp_path), resume=True)
    assert len(tuner.made) == 1 and tuner.restored == [] and tuner.fitted == 1
