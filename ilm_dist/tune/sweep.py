"""Drive Ray Tune: start (or join) Ray, run or resume the experiment, return its results.

The Ray experiment lives in ``<output_dir>/tune``; each trial's pretraining run in
``<output_dir>/trials/<trial id>``. Failed trials are recorded with their error and the sweep goes on.
"""

from __future__ import annotations

from typing import Any

from ilm_dist.tune.spec import Sweep
from ilm_dist.tune.trial import run_trial

EXPERIMENT = "tune"


def run_sweep(sweep: Sweep, resume: bool = False, retry_errored: bool = False) -> None:
    """Run (or with ``resume``, continue) the sweep; the experiment is saved in ``<output_dir>/tune``."""
    from ray import tune

    path = sweep.output / EXPERIMENT
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, sweep=sweep),
        {"cpu": sweep.settings.resources.cpus, "gpu": sweep.settings.resources.gpus},
    )
    if resume and tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(str(path), trainable=trainable, restart_errored=retry_errored)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=sweep.space.to_tune(),
            tune_config=_tune_config(sweep),
            run_config=_run_config(sweep),
        )
    tuner.fit()


def _tune_config(sweep: Sweep):
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    s = sweep.settings
    return tune.TuneConfig(
        metric=s.metric,
        mode=s.mode,
        num_samples=s.num_samples,
        search_alg=BasicVariantGenerator(random_state=s.seed, max_concurrent=s.max_concurrent),
        scheduler=_scheduler(sweep),
        trial_dirname_creator=_trial_dirname,
    )


def _scheduler(sweep: Sweep):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    cfg = sweep.settings.scheduler
    if cfg.type == "fifo":
        return FIFOScheduler()
    # trials end by themselves: stopping one at max_t would kill it before it writes its final state
    return ASHAScheduler(
        max_t=sweep.max_t,
        grace_period=cfg.grace_period,
        reduction_factor=cfg.reduction_factor,
        stop_last_trials=False,
    )


def _run_config(sweep: Sweep):
    from ray import tune

    return tune.RunConfig(
        name=EXPERIMENT,
        storage_path=str(sweep.output),
        failure_config=tune.FailureConfig(fail_fast=False, max_failures=0),
        verbose=1,
    )


def _trial_dirname(trial: Any) -> str:
    return trial.trial_id
