"""A sweep file: the base run config, the search space, the metric, scheduler and resources.

Everything is checked here, before Ray starts: the settings by type and value, the base run config
and its data (as ``launch/pretrain.py`` would), and every search-space value against the base.
Errors raise :class:`~ilm_dist.config.ConfigError` naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ilm_dist.config import (
    RunConfig,
    absolute_overrides,
    format_overrides,
    from_dict,
    load_config,
    read_yaml_mapping,
)
from ilm_dist.data.manifest import ManifestError, load_manifest
from ilm_dist.errors import ConfigError
from ilm_dist.eval.monitor import metric_names
from ilm_dist.paths import check_name
from ilm_dist.processes import ResourcesConfig
from ilm_dist.train.preflight import preflight
from ilm_dist.tune.space import SearchSpace, parse_space


@dataclass
class BaseRun:
    config: str = ""  # run-config YAML, relative to the sweep file
    overrides: list[str] = field(default_factory=list)  # fixed key=value overrides of every trial; paths
    # relative to the sweep file


@dataclass
class SchedulerConfig:
    type: Literal["asha", "fifo"] = "asha"
    grace_period: int = 1  # kNN monitor reports before ASHA may stop a trial
    reduction_factor: float = 2.0
    max_t: int | None = None  # reports of a full trial; None: train.max_steps // monitor.every


@dataclass
class SweepSettings:
    name: str = "sweep"
    output_dir: str = (
        "runs/sweeps/sweep"  # relative to the sweep file (from --output-dir: the working directory)
    )
    base: BaseRun = field(default_factory=BaseRun)
    metric: str = "knn_acc_block4"  # reported by the kNN monitor, or "loss"
    mode: Literal["max", "min"] = "max"
    num_samples: int = 1  # samples of the space (each grid value is run num_samples times)
    max_concurrent: int = 1
    seed: int = 0  # random state of the sampler
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)


@dataclass
class Sweep:
    settings: SweepSettings
    space: SearchSpace
    base_config: Path  # absolute
    base: RunConfig  # the base config with the fixed overrides

    @property
    def output(self) -> Path:
        return Path(self.settings.output_dir)

    @property
    def trials_dir(self) -> Path:
        return self.output / "trials"

    @property
    def max_t(self) -> int:
        return self.settings.scheduler.max_t or self.base.train.max_steps // self.base.monitor.every

    def run_config(self, sampled: dict[str, Any], output_dir: Path, name: str) -> RunConfig:
        """The trial's run config: base + fixed overrides + the sample (raises ConfigError)."""
        overrides = {**self.space.overrides(sampled), "output_dir": str(output_dir), "name": name}
        return load_config(self.base_config, [*self.settings.base.overrides, *format_overrides(overrides)])


def load_sweep(path: str | Path, run_overrides: list[str] = (), **settings: Any) -> Sweep:
    """Load and check a sweep file; ``run_overrides`` extend ``base.overrides``, ``settings`` replace top-level keys.

    Relative paths in the file (``output_dir``, ``base.config``, path values of ``base.overrides``) are
    relative to the file; in ``run_overrides`` and ``settings`` (the command line), to the working directory.
    """
    path = Path(path).resolve()
    raw = read_yaml_mapping(path, "the sweep file")
    raw_space = raw.pop("space", None)
    sweep_settings: SweepSettings = from_dict(SweepSettings, raw)
    sweep_settings.output_dir = str(path.parent / sweep_settings.output_dir)
    for key, value in settings.items():
        if value is not None:
            setattr(sweep_settings, key, str(Path(value).resolve()) if key == "output_dir" else value)
    sweep_settings.base.overrides = [
        *absolute_overrides(sweep_settings.base.overrides, path.parent),
        *absolute_overrides(list(run_overrides), Path.cwd()),
    ]
    _validate_settings(sweep_settings)
    base_config = (path.parent / sweep_settings.base.config).resolve()
    base = _load_base(base_config, sweep_settings)

    def check(values: dict[str, Any]) -> None:
        load_config(base_config, [*sweep_settings.base.overrides, *format_overrides(values)])

    space = parse_space(raw_space, base, check)
    sweep = Sweep(sweep_settings, space, base_config, base)
    _validate_schedule(sweep)
    return sweep


def _load_base(base_config: Path, settings: SweepSettings) -> RunConfig:
    if not settings.base.config:
        raise ConfigError("base.config: required (the run config every trial starts from)")
    try:
        base, _ = preflight(str(base_config), settings.base.overrides)
    except (ConfigError, ManifestError) as err:
        raise ConfigError(f"base: {err}") from None
    if base.monitor.every <= 0:
        raise ConfigError(
            "monitor.every: the sweep's metric comes from the kNN monitor; add monitor.every=N to base.overrides"
        )
    metrics = _reported_metrics(base)
    if settings.metric not in metrics:
        raise ConfigError(
            f"metric: {settings.metric!r} is not reported for this data; choose one of {metrics}"
        )
    return base


def _reported_metrics(base: RunConfig) -> list[str]:
    return [*metric_names(load_manifest(base.data.shards).task), "loss"]


def _validate_settings(s: SweepSettings) -> None:
    check_name(s.name, "name")  # runs/<name>/best
    checks = [
        (s.num_samples >= 1, "num_samples", "must be >= 1"),
        (s.max_concurrent >= 1, "max_concurrent", "must be >= 1"),
        (s.scheduler.grace_period >= 1, "scheduler.grace_period", "must be >= 1"),
        (s.scheduler.reduction_factor > 1, "scheduler.reduction_factor", "must be > 1"),
        (s.scheduler.max_t is None or s.scheduler.max_t >= 1, "scheduler.max_t", "must be >= 1"),
    ]
    for ok, key, message in checks:
        if not ok:
            raise ConfigError(f"{key}: {message}")
    s.resources.check("resources")


def _validate_schedule(sweep: Sweep) -> None:
    if sweep.settings.scheduler.max_t is None and sweep.base.train.max_steps is None:
        raise ConfigError("scheduler.max_t: required when the base run sets no train.max_steps")
    if sweep.max_t < 1:
        raise ConfigError(
            f"monitor.every: {sweep.base.monitor.every} is more than train.max_steps ({sweep.base.train.max_steps})"
        )
