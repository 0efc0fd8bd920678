"""The experiment file: the packed dataset, the methods, seeds, label fractions, evaluations and resources.

Every key, with its default (a relative path is relative to the experiment file, as in run configs)::

    name: demo                          # a name (ilm_dist.paths.NAME_RULE): letters, digits, '_', '.', '-'
    dataset: ../../runs/demo/data       # a packed dataset (data_tools.pack)
    output_dir: ../../runs/experiments/demo
    seeds: [0]                          # pretraining seeds; seed s also seeds the evaluations of seed s
    fractions: [0.01, 0.06, 1.0]        # label fractions of fine-tuning (and of the probe, unless it says)
    protocol: ilm_dist                  # the evaluation protocol (--protocol of every probe and finetune):
                                        # ilm_dist (built in), a name in configs/protocols, or a YAML file
    protocol_dataset: null              # the protocol's dataset section (--dataset; default: by the task)
    overrides: []                       # run-config key=value overrides of every method
    methods:                            # name -> run config; pretrained by the experiment unless weights is set;
                                        # a name as above, not 'subsets' (it names folders: runs/<name>_s<seed>, ...)
      moco:        {config: ../demo.yaml, overrides: [loss.type=none]}
      moco_mse:    {config: ../demo.yaml}
      random_init: {config: ../demo.yaml, weights: random}   # or weights: a backbone file (a fixed baseline)
    reference: random_init              # every other method is compared with it (default: random_init if
                                        # it is a method; null: none)
    comparisons: []                     # further pairs [a, b], reported as a - b, e.g. [[moco_mse, moco]]
    evaluations:                        # the evaluations to run (default: all four with default settings)
      probe:   {fractions: [...], epochs: 100}   # per-block probe: ilm-probe's options by field name
      linear:  {fractions: [...], epochs: 10}    # ilm-finetune --mode linear (FinetuneSettings fields)
      full:    {epochs: 10, min_steps: 0}        # ilm-finetune --mode full
      analyse: {num_subsets: 50}                 # CKA of full fine-tuning, KS against 100% (CkaParams)
    eval_options: {workers: 0, eval_batch_size: 128}   # EvalTarget options of every probe/finetune command
    report: {n_boot: 1000, seed: 0}     # the paired two-level bootstrap
    execution:                          # per command; ranks > 1 runs it under the deepspeed launcher
      pretrain: {cpus: <all cores>, gpus: 0, ranks: null}
      eval:     {cpus: <all cores>, gpus: 0, ranks: null}

The experiment sets ``data.shards``, ``seed``, ``name`` and ``output_dir`` of every run config, and the
``seed``, ``mode`` and ``fraction`` of every evaluation; giving them is an error. Everything is checked
when the file is loaded (run configs, data, fractions against the train split's class counts), before
anything runs; errors raise :class:`~ilm_dist.errors.ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ilm_dist.config import (
    RunConfig,
    absolute_overrides,
    format_overrides,
    from_dict,
    load_config,
    parse_override,
    read_yaml_mapping,
    set_dotted,
)
from ilm_dist.data.manifest import Manifest, ManifestError, load_manifest
from ilm_dist.errors import ConfigError, InputError
from ilm_dist.eval.context import SPLITS, EvalTarget
from ilm_dist.eval.errors import EvalError
from ilm_dist.eval.finetune import FRACTIONS
from ilm_dist.eval.protocol import BUILTIN, EvalProtocol, load_protocol
from ilm_dist.eval.settings import CkaParams, FinetuneSettings, ProbeSettings
from ilm_dist.eval.store import check_method_name
from ilm_dist.eval.subsets import subset_count
from ilm_dist.options import flag_of
from ilm_dist.paths import check_name
from ilm_dist.processes import ResourcesConfig
from ilm_dist.train.run_dir import RunDir

SET_BY_EXPERIMENT = ("data.shards", "seed", "name", "output_dir")  # run-config keys
REFERENCE = "random_init"
# evaluation -> (the settings class of its command, the fields the experiment sets)
EVALUATIONS: dict[str, tuple[type, tuple[str, ...]]] = {
    "probe": (ProbeSettings, ("fraction", "seed")),
    "linear": (FinetuneSettings, ("mode", "seed")),
    "full": (FinetuneSettings, ("mode", "seed")),
    "analyse": (CkaParams, ()),
}
FINETUNE_MODES = ("linear", "full")
EVAL_OPTIONS = ("workers", "eval_batch_size")  # of EvalTarget; the others are set by the experiment


def _all_cores() -> float:
    return float(os.cpu_count() or 1)


@dataclass
class CellResources(ResourcesConfig):
    cpus: float = field(default_factory=_all_cores)  # one command at a time uses the whole machine


@dataclass
class ExecutionConfig:
    pretrain: CellResources = field(default_factory=CellResources)
    eval: CellResources = field(default_factory=CellResources)


@dataclass
class ReportConfig:
    n_boot: int = 1000  # resamples of the two-level bootstrap
    seed: int = 0


@dataclass
class MethodConfig:
    config: str = ""  # run config
    weights: str | None = None  # None: pretrained by the experiment; 'random'; or a weights file
    overrides: list[str] = field(default_factory=list)  # run-config key=value overrides of this method


@dataclass
class ExperimentSettings:
    """The keys of the experiment file that are plain values (methods and evaluations are parsed apart)."""

    name: str = ""
    dataset: str = ""
    output_dir: str = ""
    seeds: list[int] = field(default_factory=lambda: [0])
    fractions: list[float] = field(default_factory=lambda: list(FRACTIONS))
    protocol: str = BUILTIN
    protocol_dataset: str | None = None
    overrides: list[str] = field(default_factory=list)
    reference: str | None = None
    comparisons: list[list[str]] = field(default_factory=list)
    report: ReportConfig = field(default_factory=ReportConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)


@dataclass(frozen=True)
class Method:
    name: str
    config: Path
    weights: str | None  # None (pretrained here), 'random', or an absolute path
    overrides: tuple[str, ...]  # the experiment's, then the method's; paths absolute

    @property
    def pretrained(self) -> bool:
        return self.weights is None


@dataclass(frozen=True)
class Evaluation:
    kind: str  # probe | linear | full | analyse
    fractions: tuple[float, ...]  # () for analyse
    settings: dict[str, Any]  # the experiment file's values, by field name of the command's settings

    def flags(self) -> list[str]:
        """The command-line options of the settings the file gives (the others keep the command's defaults)."""
        return settings_flags(EVALUATIONS[self.kind][0], self.settings)


@dataclass
class Experiment:
    """A loaded experiment; paths are absolute. Its directory layout (:attr:`output`)::

    experiment.yaml                  the experiment as loaded (absolute paths)
    state.json                       every cell: status, time, attempts, error, log
    history.jsonl                    one record per cell start and end, across runs
    logs/s<seed>/<method>/<cell>.log each cell's output
    runs/<method>_s<seed>/           pretraining runs (output_dir of the run)
    evals/s<seed>/                   EVAL_DIR of seed s, shared by every method: subsets/, <method>/
    report/                          report.md, summary.json, CSVs, plots
    """

    file: Path
    settings: ExperimentSettings
    methods: dict[str, Method]
    evaluations: dict[str, Evaluation]
    eval_options: dict[str, Any]
    comparisons: list[tuple[str, str]]
    manifest: Manifest
    protocol: EvalProtocol  # resolved for the dataset

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def output(self) -> Path:
        return Path(self.settings.output_dir)

    @property
    def dataset(self) -> Path:
        return Path(self.settings.dataset)

    @property
    def seeds(self) -> list[int]:
        return self.settings.seeds

    @property
    def fractions(self) -> list[float]:
        return self.settings.fractions

    def run_dir(self, method: str, seed: int) -> RunDir:
        return RunDir(self.output / "runs" / f"{method}_s{seed}")

    def eval_dir(self, seed: int) -> Path:
        return self.output / "evals" / f"s{seed}"

    def method_dir(self, method: str, seed: int) -> Path:
        return self.eval_dir(seed) / method

    @property
    def report_dir(self) -> Path:
        return self.output / "report"

    def run_overrides(self, method: Method, seed: int) -> list[str]:
        """The run-config overrides of ``method`` at ``seed``: the file's, then what the experiment sets."""
        fixed = {"data.shards": str(self.dataset), "seed": seed, "name": method.name}
        if method.pretrained:
            fixed["output_dir"] = str(self.run_dir(method.name, seed).root)
        return [*method.overrides, *format_overrides(fixed)]

    def run_config(self, method: Method, seed: int) -> RunConfig:
        return load_config(method.config, self.run_overrides(method, seed))

    def to_dict(self) -> dict[str, Any]:
        """The experiment as loaded, in the file's shape (absolute paths): written as ``experiment.yaml``."""
        plain = dataclasses.asdict(self.settings)
        plain["comparisons"] = [list(pair) for pair in self.comparisons]
        plain["methods"] = {
            m.name: {"config": str(m.config), "weights": m.weights, "overrides": list(m.overrides)}
            for m in self.methods.values()
        }
        plain["evaluations"] = {
            e.kind: ({"fractions": list(e.fractions)} if e.fractions else {}) | e.settings
            for e in self.evaluations.values()
        }
        plain["eval_options"] = self.eval_options
        return plain


# --------------------------------------------------------------------------- loading


def load_experiment(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Experiment:
    """Load and check an experiment file (see the module docstring); raises :class:`ConfigError` naming
    the file and the key.

    ``overrides``: dotted ``key=value`` replacements of the file's keys (``dataset=DIR``,
    ``report.n_boot=2000``, ``execution.pretrain.cpus=8``); their paths are relative to the working
    directory.
    """
    path = Path(path).resolve()
    try:
        return _load_experiment(path, overrides)
    except ConfigError as err:
        if str(err).startswith(str(path)):
            raise
        raise ConfigError(f"{path}: {err}") from None


def _load_experiment(path: Path, overrides: list[str] | tuple[str, ...]) -> Experiment:
    raw = read_yaml_mapping(path, "the experiment file")
    for item in overrides:
        key, value = parse_override(item)
        if key in ("dataset", "output_dir") and isinstance(value, str):
            value = str(Path(value).expanduser().resolve())
        set_dotted(raw, key, value)
    methods_raw = raw.pop("methods", None)
    evaluations_raw = raw.pop("evaluations", {name: {} for name in EVALUATIONS})
    eval_options_raw = raw.pop("eval_options", {}) or {}
    reference_given = "reference" in raw
    settings: ExperimentSettings = from_dict(ExperimentSettings, raw)
    for key in ("dataset", "output_dir"):
        if not getattr(settings, key):
            raise ConfigError(f"{key}: required")
        setattr(settings, key, str((path.parent / getattr(settings, key)).expanduser().resolve()))
    _check_settings(settings)
    manifest = _load_dataset(settings.dataset)
    common = absolute_overrides(_checked_overrides(settings.overrides, "overrides"), path.parent)
    settings.overrides = common
    methods = _load_methods(methods_raw, path.parent, common)
    if not reference_given and REFERENCE in methods:
        settings.reference = REFERENCE
    evaluations = _load_evaluations(evaluations_raw, settings.fractions)
    for evaluation in evaluations.values():
        _check_fractions(manifest, evaluation.fractions, f"evaluations.{evaluation.kind}.fractions")
    experiment = Experiment(
        path,
        settings,
        methods,
        evaluations,
        _load_eval_options(eval_options_raw),
        _comparisons(settings, methods),
        manifest,
        _load_protocol(settings, manifest),
    )
    for method in methods.values():
        try:
            experiment.run_config(method, settings.seeds[0])
        except ConfigError as err:
            raise ConfigError(f"methods.{method.name}: {method.config}: {err}") from None
    return experiment


def _load_protocol(settings: ExperimentSettings, manifest: Manifest) -> EvalProtocol:
    """The protocol resolved for the dataset's task, as every evaluation command will resolve it."""
    key = "protocol_dataset" if settings.protocol_dataset else "protocol"
    try:
        return load_protocol(settings.protocol).resolve(manifest.task, settings.protocol_dataset)
    except EvalError as err:
        raise ConfigError(f"{key}: {err}") from None


def _check_settings(s: ExperimentSettings) -> None:
    check_name(s.name, "name")
    checks = [
        (len(s.seeds) > 0, "seeds", "at least one seed"),
        (all(seed >= 0 for seed in s.seeds), "seeds", f"{s.seeds}: seeds are >= 0"),
        (len(set(s.seeds)) == len(s.seeds), "seeds", f"{s.seeds}: repeated seed"),
        (s.report.n_boot >= 1, "report.n_boot", "must be >= 1"),
    ]
    for ok, key, message in checks:
        if not ok:
            raise ConfigError(f"{key}: {message}")
    s.fractions = _checked_fractions(s.fractions, "fractions")
    s.execution.pretrain.check("execution.pretrain")
    s.execution.eval.check("execution.eval")


def _checked_fractions(fractions: list[float], key: str) -> list[float]:
    if not fractions:
        raise ConfigError(f"{key}: at least one label fraction")
    for f in fractions:
        if not 0 < f <= 1:
            raise ConfigError(f"{key}: label fraction {f}: must be in (0, 1]")
    if len(set(fractions)) != len(fractions):
        raise ConfigError(f"{key}: {fractions}: repeated fraction")
    return sorted(fractions)


def _load_dataset(root: str) -> Manifest:
    try:
        manifest = load_manifest(root)
        for split in SPLITS:
            manifest.split(split)
    except (ManifestError, InputError) as err:
        raise ConfigError(f"dataset: {err}") from None
    return manifest


def _check_fractions(manifest: Manifest, fractions: tuple[float, ...], key: str) -> None:
    """A fraction that leaves a class of the train split without a labelled image is refused here, not
    in every method's evaluation (the rule of :func:`ilm_dist.eval.subsets.stratified_subset`)."""
    for fraction in fractions:
        for name, n in manifest.split("train").class_counts.items():
            if fraction < 1 and subset_count(fraction, n) == 0:
                raise ConfigError(
                    f"{key}: label fraction {fraction} leaves class {name!r} empty ({n} train samples x "
                    f"{fraction} = {n * fraction:.2f}); use a larger fraction"
                )


def _checked_overrides(overrides: list[str], key: str) -> list[str]:
    for item in overrides:
        name = item.partition("=")[0].strip()
        if name in SET_BY_EXPERIMENT:
            raise ConfigError(
                f"{key}: {item!r}: {name} is set by the experiment (dataset, seeds, method name)"
            )
    return overrides


def _load_methods(raw: Any, directory: Path, common: list[str]) -> dict[str, Method]:
    if not isinstance(raw, dict) or not raw:
        raise ConfigError("methods: expected a mapping of method names to {config: RUN_CONFIG, ...}")
    methods = {}
    for name, entry in raw.items():
        check_method_name(name, "methods")
        key = f"methods.{name}"
        cfg: MethodConfig = from_dict(MethodConfig, entry if entry is not None else {}, f"{key}.")
        if not cfg.config:
            raise ConfigError(f"{key}.config: required (the method's run config)")
        config = (directory / cfg.config).expanduser().resolve()
        if not config.is_file():
            raise ConfigError(f"{key}.config: file not found: {config}")
        weights = cfg.weights
        if weights not in (None, "random"):
            weights = str((directory / weights).expanduser().resolve())
            if not Path(weights).exists():
                raise ConfigError(f"{key}.weights: not found: {weights} (or use 'random')")
        own = absolute_overrides(_checked_overrides(cfg.overrides, f"{key}.overrides"), directory)
        methods[name] = Method(name, config, weights, (*common, *own))
    return methods


def _load_evaluations(raw: Any, fractions: list[float]) -> dict[str, Evaluation]:
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"evaluations: expected a mapping with some of {list(EVALUATIONS)}")
    evaluations = {}
    for kind, entry in raw.items():
        if kind not in EVALUATIONS:
            raise ConfigError(f"evaluations.{kind}: unknown evaluation; expected some of {list(EVALUATIONS)}")
        if not isinstance(entry or {}, dict):
            raise ConfigError(f"evaluations.{kind}: expected a mapping of settings, got {entry!r}")
        values = dict(entry or {})
        own = values.pop("fractions", None)
        if kind == "analyse" and own is not None:
            raise ConfigError("evaluations.analyse.fractions: analyse covers every full fine-tuning result")
        chosen = (
            ()
            if kind == "analyse"
            else tuple(_checked_fractions(own or fractions, f"evaluations.{kind}.fractions"))
        )
        evaluations[kind] = Evaluation(kind, chosen, _checked_settings(kind, values))
    if "analyse" in evaluations and "full" not in evaluations and not _has_full_labels(evaluations):
        raise ConfigError(
            "evaluations.analyse: computes CKA of full fine-tuning and KS against 100% labels; add "
            "evaluations.full, or fraction 1 to a fine-tuning"
        )
    return evaluations


def _has_full_labels(evaluations: dict[str, Evaluation]) -> bool:
    return any(1.0 in evaluations[m].fractions for m in FINETUNE_MODES if m in evaluations)


def _checked_settings(kind: str, values: dict[str, Any]) -> dict[str, Any]:
    """The settings as given, checked by type and bounds against the command's settings class."""
    cls, fixed = EVALUATIONS[kind]
    for key in values:
        if key in fixed:
            raise ConfigError(
                f"evaluations.{kind}.{key}: set by the experiment (the seed is the pretraining seed; "
                "mode and fraction follow from the evaluation and its fractions)"
            )
    return _typed(cls, values, f"evaluations.{kind}")


def _load_eval_options(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(f"eval_options: expected a mapping of {list(EVAL_OPTIONS)}, got {raw!r}")
    for key in raw:
        if key not in EVAL_OPTIONS:
            raise ConfigError(f"eval_options.{key}: unknown key; expected some of {list(EVAL_OPTIONS)}")
    values = {"weights": "random", "out": ".", **raw}  # required fields, set per cell
    _typed(EvalTarget, values, "eval_options")
    return dict(raw)


def _typed(cls: type, values: dict[str, Any], key: str) -> dict[str, Any]:
    """``values`` checked by :func:`~ilm_dist.config.from_dict` (types, unknown keys) and the class's bounds."""
    try:
        built = from_dict(cls, values, f"{key}.")
    except ConfigError:
        raise
    except InputError as err:  # a bound checked in __post_init__, named by the command's flag
        raise ConfigError(f"{key}: {err}") from None
    return {name: getattr(built, name) for name in values}


def settings_flags(cls: type, settings: dict[str, Any]) -> list[str]:
    """``settings`` (field name -> value) as the command-line options of ``cls``'s fields."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    flags: list[str] = []
    for name, value in settings.items():
        flag = flag_of(fields[name])
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag.removeprefix("--"))
        else:
            flags += [flag, str(value)]
    return flags


def _comparisons(settings: ExperimentSettings, methods: dict[str, Method]) -> list[tuple[str, str]]:
    """Every method against the reference, then the file's pairs; each pair once."""
    if settings.reference is not None and settings.reference not in methods:
        raise ConfigError(f"reference: {settings.reference!r} is not a method ({', '.join(methods)})")
    pairs = [(m, settings.reference) for m in methods if settings.reference and m != settings.reference]
    for i, pair in enumerate(settings.comparisons):
        key = f"comparisons[{i}]"
        if len(pair) != 2:
            raise ConfigError(f"{key}: {pair}: expected [a, b], reported as a - b")
        for name in pair:
            if name not in methods:
                raise ConfigError(f"{key}: {name!r} is not a method ({', '.join(methods)})")
        if pair[0] == pair[1]:
            raise ConfigError(f"{key}: {pair}: a method compared with itself")
        if tuple(pair) not in pairs:
            pairs.append((pair[0], pair[1]))
    return pairs
