"""Evaluation protocols: named sets of defaults for the evaluation commands' settings.

A protocol is a YAML file (``configs/protocols/<name>.yaml``, or any path; ``base:`` names files it
extends, relative to itself) with the values it sets for :class:`~ilm_dist.eval.settings.FinetuneSettings`
(``finetune:``), :class:`~ilm_dist.eval.settings.ProbeSettings` (``probe:``) and
:class:`~ilm_dist.eval.settings.CkaParams` (``cka:``), the input normalisation (``inputs: run`` keeps
the run config's mean/std, ``to_tensor`` feeds pixel values in [0, 1] as ``ToTensor`` does), and per
dataset (``datasets: {name: {task: ..., finetune: ..., probe: ...}}``) the values that differ between
datasets, such as training augmentations (``aug``: run-config ``aug`` fields) and metrics. A flag given
on the command line overrides the protocol; what neither sets keeps the dataclass default. The built-in
``ilm_dist`` protocol sets nothing: ilm_dist's defaults (docs/PROTOCOL.md has both, row by row).

The dataset section is ``--dataset NAME``, or else the only one whose ``task`` is the packed dataset's
task. Each method directory records the resolved protocol (``protocol.json``: every setting with its
value, and a digest) and accepts no other; every ``metrics.json`` names it, and the analysis refuses to
compare methods evaluated under different protocols.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ilm_dist.config import AugConfig, from_dict, load_yaml_chain, validate_aug
from ilm_dist.data.manifest import TASKS
from ilm_dist.errors import InputError
from ilm_dist.eval.errors import EvalError
from ilm_dist.eval.settings import CkaParams, FinetuneSettings, ProbeSettings
from ilm_dist.eval.store import digest
from ilm_dist.options import given_options

log = logging.getLogger("ilm_dist")

PROTOCOL_DIR = Path(__file__).resolve().parents[2] / "configs" / "protocols"
BUILTIN = "ilm_dist"  # the dataclass defaults; no file
INPUTS = ("run", "to_tensor")
TOP_LEVEL = ("name", "description", "inputs", "finetune", "probe", "cka", "datasets")
PER_DATASET = ("task", "finetune", "probe")
SECTIONS: dict[str, type] = {"finetune": FinetuneSettings, "probe": ProbeSettings, "cka": CkaParams}


@dataclass(frozen=True)
class EvalProtocol:
    """A protocol resolved for one dataset: the values it sets per section."""

    name: str
    source: str  # the file, or "built-in"
    dataset: str | None
    inputs: str
    values: dict[str, dict[str, Any]]  # section -> field -> value set by the protocol

    def settings(self, section: str, given: dict[str, Any] | None = None) -> Any:
        """The section's settings: dataclass defaults, then the protocol's values, then ``given`` (flags)."""
        return SECTIONS[section](**(self.values.get(section, {}) | (given or {})))

    def resolved(self) -> dict[str, dict[str, Any]]:
        """Every setting of every section with the value the protocol gives it (defaults included)."""
        return {section: dataclasses.asdict(self.settings(section)) for section in SECTIONS}

    @property
    def digest(self) -> str:
        return digest({"name": self.name, "dataset": self.dataset, "inputs": self.inputs, **self.resolved()})

    def summary(self) -> dict[str, Any]:
        """What each ``metrics.json`` records of the protocol."""
        return {"name": self.name, "dataset": self.dataset, "digest": self.digest, "source": self.source}

    def record(self) -> dict[str, Any]:
        """``protocol.json``: the summary, the inputs and every resolved setting."""
        return self.summary() | {"inputs": self.inputs, **self.resolved()}


BUILTIN_PROTOCOL = EvalProtocol(BUILTIN, "built-in", None, "run", {})


def settings_from_args(protocol: EvalProtocol, section: str, args) -> Any:
    """The section's settings for a command: the protocol's values overridden by the flags on its line."""
    return protocol.settings(section, given_options(SECTIONS[section], args))


def recorded_protocol(record: dict[str, Any]) -> EvalProtocol:
    """The protocol a ``protocol.json`` records (its resolved values)."""
    values = {section: record[section] for section in SECTIONS}
    return EvalProtocol(record["name"], record["source"], record["dataset"], record["inputs"], values)


@dataclass(frozen=True)
class Protocol:
    """A protocol file, checked: values of every section and of each dataset, not yet resolved."""

    name: str
    source: str
    inputs: str
    values: dict[str, dict[str, Any]]
    datasets: dict[str, dict[str, Any]]

    def resolve(self, task: str, dataset: str | None) -> EvalProtocol:
        """The protocol for a packed dataset of ``task``; ``dataset`` names its section (see module doc)."""
        name = dataset if dataset is not None else self._dataset_for(task)
        if name is None:
            return EvalProtocol(self.name, self.source, None, self.inputs, self.values)
        if name not in self.datasets:
            raise EvalError(
                f"--dataset {name}: protocol {self.name} ({self.source}) has no such dataset; it has "
                f"{', '.join(self.datasets) or 'none'}"
            )
        entry = self.datasets[name]
        if entry["task"] != task:
            raise EvalError(
                f"--dataset {name}: protocol {self.name} describes {name} as a {entry['task']} task, but the "
                f"packed dataset is {task}"
            )
        values = {s: self.values.get(s, {}) | entry.get(s, {}) for s in SECTIONS}
        return EvalProtocol(self.name, self.source, name, self.inputs, values)

    def _dataset_for(self, task: str) -> str | None:
        if not self.datasets:
            return None
        fitting = [name for name, entry in self.datasets.items() if entry["task"] == task]
        if len(fitting) == 1:
            return fitting[0]
        tasks = ", ".join(f"{name} ({entry['task']})" for name, entry in self.datasets.items())
        what = "several fit" if fitting else "none fits"
        fix = "pass --dataset NAME" if fitting else "add a dataset section for it to the protocol file"
        raise EvalError(
            f"protocol {self.name} ({self.source}) has datasets {tasks}; {what} a {task} task: {fix}"
        )


def load_protocol(spec: str) -> Protocol:
    """``spec``: ``ilm_dist`` (built in), a name in ``configs/protocols/``, or a YAML file path."""
    if spec == BUILTIN:
        return Protocol(BUILTIN_PROTOCOL.name, BUILTIN_PROTOCOL.source, BUILTIN_PROTOCOL.inputs, {}, {})
    path = Path(spec).expanduser()
    if not path.is_file():
        if spec.endswith((".yaml", ".yml")) or "/" in spec:
            raise EvalError(f"--protocol {spec}: no such file")
        path = PROTOCOL_DIR / f"{spec}.yaml"
        if not path.is_file():
            names = ", ".join([BUILTIN, *sorted(p.stem for p in PROTOCOL_DIR.glob("*.yaml"))])
            raise EvalError(f"--protocol {spec}: not a protocol name ({names}) or a YAML file")
    try:
        raw = load_yaml_chain(path, path_keys=())
    except InputError as err:
        raise EvalError(f"--protocol: {err}") from None
    return _check(raw, path.resolve())


def _check(raw: dict[str, Any], path: Path) -> Protocol:
    unknown = sorted(set(raw) - set(TOP_LEVEL))
    if unknown:
        raise EvalError(f"{path}: unknown key(s) {unknown}; a protocol has {', '.join(TOP_LEVEL)}")
    name = raw.get("name", path.stem)
    inputs = raw.get("inputs", "run")
    if inputs not in INPUTS:
        raise EvalError(f"{path}: inputs is {inputs!r}, expected one of {INPUTS}")
    values = {s: _section(raw.get(s), s, path, f"{s}") for s in SECTIONS if s in raw}
    datasets = {}
    for dataset, entry in (raw.get("datasets") or {}).items():
        where = f"datasets.{dataset}"
        if not isinstance(entry, dict) or entry.get("task") not in TASKS:
            raise EvalError(f"{path}: {where}.task must be one of {TASKS}")
        extra = sorted(set(entry) - set(PER_DATASET))
        if extra:
            raise EvalError(
                f"{path}: unknown key(s) {extra} in {where}; a dataset has {', '.join(PER_DATASET)}"
            )
        datasets[dataset] = {"task": entry["task"]} | {
            s: _section(entry[s], s, path, f"{where}.{s}") for s in ("finetune", "probe") if s in entry
        }
    return Protocol(str(name), str(path), inputs, values, datasets)


def _section(raw: Any, section: str, path: Path, where: str) -> dict[str, Any]:
    """A section's values, typed and in bounds (built into its dataclass once to check them)."""
    raw = dict(raw or {})
    aug = raw.pop("aug", None)
    try:
        built = from_dict(SECTIONS[section], raw, f"{where}.")
        if aug is not None:
            validate_aug(from_dict(AugConfig, aug, f"{where}.aug."))
    except InputError as err:
        raise EvalError(f"{path}: {err}") from None
    values = {key: getattr(built, key) for key in raw}
    return values if aug is None else values | {"aug": dict(aug)}
