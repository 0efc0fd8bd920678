"""The cells of an experiment: one command each, the cells it needs, the files that mean it is done.

For every seed ``s`` and method ``m`` (ids ``s<s>/<m>/<kind>``):

- ``pretrain``: ``python -m ilm_dist.pretrain`` into ``runs/<m>_s<s>`` (methods without ``weights``);
  ``--resume`` when that directory holds a checkpoint of an interrupted run, ``--overwrite`` when it
  holds an interrupted run without one;
- ``probe_f<f>``: ``python -m ilm_dist.eval probe`` at label fraction ``f``;
- ``linear``, ``full``: ``python -m ilm_dist.eval finetune --mode linear|full --fractions ...``; the
  command saves each fraction's result once, so an interrupted cell continues with the next fraction;
- ``analyse``: ``python -m ilm_dist.eval analyse`` on the method's directory: CKA (cached per result in
  ``cka.json``) and KS, with a per-method report in ``evals/s<s>/<m>/analysis/``.

Every evaluation of seed ``s`` writes into the one EVAL_DIR ``evals/s<s>`` with ``--seed s``, so all
methods of a seed are fine-tuned and probed on the same label subsets (drawn once per fraction and seed
in ``evals/s<s>/subsets``), with the same head initialisation and batch order; the label subsets, like
the pretraining, change with the seed, so the spread over seeds includes the choice of labelled images.
Random initialisation (``weights: random``) is seeded by ``s`` too.

A cell is done when the files it writes exist (the commands' own results, the truth on disk, whatever
``state.json`` says); ``analyse`` also needs to be newer than every result it read and to have run with
the same arguments. Results saved under other settings than the experiment's are refused
(:func:`check_saved`): the commands reuse saved results, so running them again would not recompute.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ilm_dist.config import ConfigError, load_config
from ilm_dist.eval.context import EvalTarget
from ilm_dist.eval.probe import PREDICTIONS
from ilm_dist.eval.settings import CkaParams
from ilm_dist.eval.store import digest, finetune_dir, fraction_tag, probe_result_dir, read_json
from ilm_dist.experiment.config import (
    EVALUATIONS,
    FINETUNE_MODES,
    Evaluation,
    Experiment,
    Method,
    settings_flags,
)
from ilm_dist.processes import ResourcesConfig

PRETRAIN_MODULE = "ilm_dist.pretrain"
EVAL_MODULE = "ilm_dist.eval"
ANALYSIS_DIR = "analysis"


@dataclass(frozen=True)
class Cell:
    id: str
    kind: str  # pretrain | probe | linear | full | analyse
    seed: int
    method: str
    module_args: tuple[str, ...]  # python -m <module_args>
    resources: ResourcesConfig
    needs: tuple[str, ...] = ()  # ids of the cells whose results it reads
    outputs: tuple[Path, ...] = ()  # files that exist once it is done
    inputs: tuple[Path, ...] = ()  # analyse: the results it must be newer than

    @property
    def signature(self) -> str:
        """Identity of the command line: an ``analyse`` cell whose arguments changed runs again."""
        return digest(list(self.module_args))

    def is_done(self, recorded_signature: str | None = None) -> bool:
        if not all(path.is_file() for path in self.outputs):
            return False
        if self.kind != "analyse":
            return True
        if recorded_signature != self.signature:
            return False
        newest_input = max((_mtime(p) for p in self.inputs if p.exists()), default=0)
        return min(map(_mtime, self.outputs)) >= newest_input


def _mtime(path: Path) -> int:
    return path.stat().st_mtime_ns


def cell_id(seed: int, method: str, kind: str) -> str:
    return f"s{seed}/{method}/{kind}"


def plan(exp: Experiment) -> list[Cell]:
    """Every cell, seed by seed and method by method, each after the cells it needs."""
    cells = []
    for seed in exp.seeds:
        for method in exp.methods.values():
            cells += _method_cells(exp, method, seed)
    return cells


def _method_cells(exp: Experiment, method: Method, seed: int) -> list[Cell]:
    pretrain = [_pretrain_cell(exp, method, seed)] if method.pretrained else []
    needs = tuple(c.id for c in pretrain)
    evals = []
    if "probe" in exp.evaluations:
        evals += [_probe_cell(exp, method, seed, f, needs) for f in exp.evaluations["probe"].fractions]
    evals += [
        _finetune_cell(exp, method, seed, mode, needs) for mode in FINETUNE_MODES if mode in exp.evaluations
    ]
    analyse = [_analyse_cell(exp, method, seed, evals)] if "analyse" in exp.evaluations else []
    return [*pretrain, *evals, *analyse]


def _pretrain_cell(exp: Experiment, method: Method, seed: int) -> Cell:
    run = exp.run_dir(method.name, seed)
    args = [PRETRAIN_MODULE, "--config", str(method.config), *exp.run_overrides(method, seed)]
    if run.latest_tag() is not None:
        args.append("--resume")  # an interrupted run with a checkpoint
    elif run.earlier_run_files() and not run.final_state.is_file():
        args.append("--overwrite")  # an interrupted run before its first checkpoint: nothing to keep
    return Cell(
        cell_id(seed, method.name, "pretrain"),
        "pretrain",
        seed,
        method.name,
        tuple(args),
        exp.settings.execution.pretrain,
        outputs=(run.final_state, run.backbone),
    )


def _target_args(exp: Experiment, method: Method, seed: int) -> tuple[list[str], list[str]]:
    """The EvalTarget options and the run-config overrides of an evaluation of ``method`` at ``seed``."""
    if method.pretrained:  # the run's own config.yaml, which holds the experiment's settings
        target = {"weights": str(exp.run_dir(method.name, seed).root)}
        overrides: list[str] = []
    else:
        target = {"weights": method.weights, "config": str(method.config)}
        overrides = exp.run_overrides(method, seed)
    target |= {"out": str(exp.eval_dir(seed)), "name": method.name, **exp.eval_options}
    target["protocol"] = exp.settings.protocol
    if exp.settings.protocol_dataset:
        target["dataset"] = exp.settings.protocol_dataset
    return settings_flags(EvalTarget, target), overrides


def _evaluation_args(
    exp: Experiment, method: Method, seed: int, evaluation: Evaluation, fixed: dict[str, Any], extra=()
) -> list[str]:
    """``ilm_dist.eval probe|finetune`` with the target (and the protocol), the settings the experiment
    fixes and those of the file, ``extra`` options and the run-config overrides."""
    command = "probe" if evaluation.kind == "probe" else "finetune"
    target, overrides = _target_args(exp, method, seed)
    fixed_flags = settings_flags(EVALUATIONS[evaluation.kind][0], {**fixed, "seed": seed})
    # extra first: a list option (--fractions) must not take the overrides for its values
    return [EVAL_MODULE, command, *extra, *target, *fixed_flags, *evaluation.flags(), *overrides]


def _probe_cell(exp: Experiment, method: Method, seed: int, fraction: float, needs: tuple[str, ...]) -> Cell:
    result = probe_result_dir(exp.method_dir(method.name, seed), fraction)
    args = _evaluation_args(exp, method, seed, exp.evaluations["probe"], {"fraction": fraction})
    if (result / "metrics.json").is_file() and not (result / PREDICTIONS).is_file():
        args.append("--force")  # probed by an ilm_dist that saved no test predictions
    return Cell(
        cell_id(seed, method.name, f"probe_{fraction_tag(fraction)}"),
        "probe",
        seed,
        method.name,
        tuple(args),
        exp.settings.execution.eval,
        needs,
        (result / "metrics.json", result / PREDICTIONS),
    )


def _finetune_cell(exp: Experiment, method: Method, seed: int, mode: str, needs: tuple[str, ...]) -> Cell:
    method_dir = exp.method_dir(method.name, seed)
    fractions = exp.evaluations[mode].fractions
    fractions_flag = ["--fractions", *map(str, fractions)]
    args = _evaluation_args(exp, method, seed, exp.evaluations[mode], {"mode": mode}, fractions_flag)
    outputs = [
        finetune_dir(method_dir, mode, f) / name
        for f in fractions
        for name in ("metrics.json", "predictions.npz", "features_test.npz")
    ]
    if mode == "full":
        outputs.append(method_dir / "init_features_test.npz")
    return Cell(
        cell_id(seed, method.name, mode),
        mode,
        seed,
        method.name,
        tuple(args),
        exp.settings.execution.eval,
        needs,
        tuple(outputs),
    )


def _analyse_cell(exp: Experiment, method: Method, seed: int, evals: list[Cell]) -> Cell:
    method_dir = exp.method_dir(method.name, seed)
    flags = exp.evaluations["analyse"].flags()
    args = (EVAL_MODULE, "analyse", str(method_dir), "--out", str(method_dir / ANALYSIS_DIR), *flags)
    one_process = ResourcesConfig(cpus=exp.settings.execution.eval.cpus, gpus=0.0, ranks=1)
    return Cell(
        cell_id(seed, method.name, "analyse"),
        "analyse",
        seed,
        method.name,
        args,
        one_process,
        tuple(c.id for c in evals),
        (method_dir / ANALYSIS_DIR / "report.md",),
        tuple(p for c in evals for p in c.outputs if p.name == "metrics.json"),
    )


def cka_params(exp: Experiment) -> CkaParams:
    """The CKA settings of the analyse cells: the protocol's, with the experiment's over them."""
    return exp.protocol.settings("cka", exp.evaluations["analyse"].settings)


# --------------------------------------------------------------------------- saved results


def check_saved(exp: Experiment) -> None:
    """Refuse results saved under settings the experiment no longer has, naming the file and the key."""
    for seed in exp.seeds:
        for method in exp.methods.values():
            if method.pretrained:
                _check_run(exp, method, seed)
            for evaluation in exp.evaluations.values():
                if evaluation.kind != "analyse":
                    _check_evaluation(exp, method, seed, evaluation)


def _check_run(exp: Experiment, method: Method, seed: int) -> None:
    run = exp.run_dir(method.name, seed)
    saved = run.config
    if not saved.is_file():
        return
    try:
        before = _flat(load_config(saved).to_dict())
    except ConfigError as err:
        raise ConfigError(
            f"{saved}: cannot read this earlier run's config ({err}); delete {run.root}"
        ) from None
    now = _flat(exp.run_config(method, seed).to_dict())
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    if changed:
        shown = ", ".join(f"{k}: {before.get(k)!r} there, {now.get(k)!r} now" for k in changed[:3])
        raise ConfigError(
            f"methods.{method.name}: {run.root} was pretrained with another run config ({shown}); delete that "
            "directory to pretrain again, or give the changed method another name"
        )


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[prefix + key] = value
    return flat


def _check_evaluation(exp: Experiment, method: Method, seed: int, evaluation: Evaluation) -> None:
    method_dir = exp.method_dir(method.name, seed)
    for fraction in evaluation.fractions:
        if evaluation.kind == "probe":
            path = probe_result_dir(method_dir, fraction) / "metrics.json"
            fixed = {"fraction": fraction}
        else:
            path = finetune_dir(method_dir, evaluation.kind, fraction) / "metrics.json"
            fixed = {"mode": evaluation.kind}
        if path.is_file():
            _check_settings(exp, path, evaluation, {**fixed, "seed": seed})


def _check_settings(exp: Experiment, path: Path, evaluation: Evaluation, fixed: dict[str, Any]) -> None:
    """Every setting must be the one the command would use now: the protocol's for the dataset, with the
    experiment's values over it."""
    section = "probe" if evaluation.kind == "probe" else "finetune"
    expected = dataclasses.asdict(exp.protocol.settings(section, {**evaluation.settings, **fixed}))
    record = read_json(path)
    saved, protocol = record.get("settings", {}), record.get("protocol")
    if protocol and protocol["digest"] != exp.protocol.digest:
        raise ConfigError(
            f"protocol: {path} was computed under protocol {protocol['name']} (dataset {protocol['dataset']}), "
            f"not {exp.protocol.name} (dataset {exp.protocol.dataset}); restore the protocol, or give the "
            "experiment another output_dir"
        )
    for key, value in expected.items():
        if key in saved and saved[key] != value:
            raise ConfigError(
                f"evaluations.{evaluation.kind}: {path} was computed with {key}={saved[key]!r}, the experiment "
                f"says {key}={value!r}; delete {path.parent} to recompute it, or restore the setting"
            )


def log_path(exp: Experiment, cell: Cell) -> Path:
    return exp.output / "logs" / f"{cell.id}.log"
