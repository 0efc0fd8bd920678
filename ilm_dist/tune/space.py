"""The search space: ``{dotted run-config key: {kind: argument}}`` parsed and checked before Ray starts.

Kinds: ``choice: [v, ...]`` and ``grid: [v, ...]`` (every value, once per sample), ``uniform: [low, high]``,
``loguniform: [low, high]`` (low > 0), ``randint: [low, high]`` (high excluded). Keys are leaf fields
of :class:`~ilm_dist.config.RunConfig`, plus ``loss.weights.block<b>`` (b in 1..4): the weight of
block b, from which ``loss.weights`` is built for the trial's ``loss.blocks``, so that a sampled
``loss.blocks`` subset always gets one weight per block. Every error names its key.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ilm_dist.config import BLOCKS, ConfigError, RunConfig, section_fields

KINDS = ("choice", "grid", "uniform", "loguniform", "randint")
BLOCK_WEIGHT = "loss.weights.block"
RESERVED = {
    "name": "each trial is named by its Ray trial id",
    "output_dir": "each trial writes to <sweep>/trials/<id>",
}

Checker = Callable[[dict[str, Any]], None]  # raises ConfigError when these overrides make the base invalid


@dataclass(frozen=True)
class Param:
    key: str
    kind: str
    args: tuple[Any, ...]  # the candidates (choice, grid) or (low, high)

    def probes(self) -> list[Any]:
        """Values that must each give a valid run config: every candidate, or both ends of a range."""
        if self.kind in ("choice", "grid"):
            return list(self.args)
        low, high = self.args
        return [low, high - 1] if self.kind == "randint" else [low, high]

    def to_tune(self) -> Any:
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.args))
        if self.kind == "grid":
            return tune.grid_search(list(self.args))
        return getattr(tune, self.kind)(*self.args)


@dataclass(frozen=True)
class SearchSpace:
    params: tuple[Param, ...]
    base_blocks: tuple[int, ...]  # loss.blocks and loss.weights of the base run config
    base_weights: tuple[float, ...]

    def block_subsets(self) -> list[list[int]]:
        """The values ``loss.blocks`` can take: the space's candidates, else the base's."""
        candidates = [p.args for p in self.params if p.key == "loss.blocks"]
        subsets = [list(v) for v in (candidates[0] if candidates else ()) if isinstance(v, list)]
        return subsets or [list(self.base_blocks)]  # non-list candidates fail their own check

    def to_tune(self) -> dict[str, Any]:
        return {p.key: p.to_tune() for p in self.params}

    def overrides(self, sampled: dict[str, Any]) -> dict[str, Any]:
        """Run-config overrides for one sample: block weights folded into ``loss.weights``."""
        sampled = {key: plain(value) for key, value in sampled.items()}
        out = {k: v for k, v in sampled.items() if not k.startswith(BLOCK_WEIGHT)}
        if len(out) < len(sampled) or "loss.blocks" in sampled:
            default = dict(zip(self.base_blocks, self.base_weights, strict=True))
            blocks = out.get("loss.blocks", self.base_blocks)
            out["loss.weights"] = [sampled.get(f"{BLOCK_WEIGHT}{b}", default.get(b)) for b in blocks]
        return out


def plain(value: Any) -> Any:
    """Numpy scalars (as Ray samples them) to Python values, recursively through lists."""
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value.item() if hasattr(value, "item") else value


# --------------------------------------------------------------------------- parsing


def parse_space(raw: Any, base: RunConfig, check: Checker) -> SearchSpace:
    """Parse ``raw`` and check every value against the base run config (``check``)."""
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"space: expected a non-empty mapping of run-config keys, got {raw!r}")
    params = tuple(parse_param(str(key), spec) for key, spec in raw.items())
    space = SearchSpace(params, tuple(base.loss.blocks), tuple(base.loss.weights))
    for param in params:
        _check_values(param, check, space.block_subsets())
    _check_blocks_and_weights(space)
    return space


def parse_param(key: str, spec: Any) -> Param:
    _check_key(key)
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise ConfigError(f"space.{key}: expected one of {{{': ..., '.join(KINDS)}: ...}}, got {spec!r}")
    kind, arg = next(iter(spec.items()))
    if kind in ("choice", "grid"):
        if not isinstance(arg, list) or not arg:
            raise ConfigError(f"space.{key}: empty {kind}; give a non-empty list of values")
        return Param(key, kind, tuple(arg))
    return Param(key, kind, _parse_range(key, kind, arg))


def _parse_range(key: str, kind: str, arg: Any) -> tuple[Any, Any]:
    number = int if kind == "randint" else int | float
    if not (isinstance(arg, list) and len(arg) == 2 and all(_is(v, number) for v in arg)):
        raise ConfigError(
            f"space.{key}: {kind} needs [low, high] ({'integers' if kind == 'randint' else 'numbers'}), got {arg!r}"
        )
    low, high = arg
    if low >= high:
        raise ConfigError(f"space.{key}: {kind} needs low < high, got [{low}, {high}]")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"space.{key}: loguniform needs low > 0, got {low}")
    return low, high


def _is(value: Any, tp: Any) -> bool:
    return isinstance(value, tp) and not isinstance(value, bool)


def _check_key(key: str) -> None:
    if key in RESERVED:
        raise ConfigError(f"space.{key}: set by the sweep ({RESERVED[key]})")
    if key.startswith(BLOCK_WEIGHT):
        if key[len(BLOCK_WEIGHT) :] not in {str(b) for b in BLOCKS}:
            raise ConfigError(f"space.{key}: per-block weights are {BLOCK_WEIGHT}1 .. {BLOCK_WEIGHT}4")
        return
    cls: Any = RunConfig
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"space.{key}: '{'.'.join(parts[:depth])}' is not a section")
        hints = section_fields(cls)
        if part not in hints:
            close = difflib.get_close_matches(part, list(hints), n=1)
            prefix = ".".join([*parts[:depth], ""])
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f"; valid keys: {', '.join(hints)}"
            raise ConfigError(f"space.{key}: unknown key '{prefix}{part}'{hint}")
        cls = hints[part]
    if dataclasses.is_dataclass(cls):
        first = dataclasses.fields(cls)[0].name
        raise ConfigError(f"space.{key}: is a section; sweep its fields, e.g. {key}.{first}")


def _check_values(param: Param, check: Checker, subsets: list[list[int]]) -> None:
    for value in param.probes():
        try:
            check(_probe(param.key, value, subsets))
        except ConfigError as err:
            raise ConfigError(f"space.{param.key}={value!r}: {err}") from None


def _probe(key: str, value: Any, subsets: list[list[int]]) -> dict[str, Any]:
    """Overrides that test ``key=value`` alone, with ``loss.blocks`` and ``loss.weights`` kept paired."""
    if key.startswith(BLOCK_WEIGHT):
        return {"loss.blocks": [int(key[len(BLOCK_WEIGHT) :])], "loss.weights": [value]}
    if key == "loss.blocks" and isinstance(value, list):
        return {key: value, "loss.weights": [0.0] * len(value)}
    if key == "loss.weights" and isinstance(value, list):
        return {key: value, "loss.blocks": next((s for s in subsets if len(s) == len(value)), subsets[0])}
    return {key: value}


def _check_blocks_and_weights(space: SearchSpace) -> None:
    """Every sampled ``loss.blocks`` gets one weight per block."""
    by_key = {p.key: p for p in space.params}
    subsets = space.block_subsets()
    per_block = {int(k[len(BLOCK_WEIGHT) :]) for k in by_key if k.startswith(BLOCK_WEIGHT)}
    if "loss.weights" in by_key:
        if per_block:
            raise ConfigError(f"space.loss.weights: give either loss.weights or {BLOCK_WEIGHT}<b>, not both")
        for weights, subset in itertools.product(by_key["loss.weights"].args, subsets):
            if not isinstance(weights, list) or len(weights) != len(subset):
                raise ConfigError(
                    f"space.loss.weights: {weights!r} does not have one weight per block of loss.blocks "
                    f"{subset}; sample per-block weights ({BLOCK_WEIGHT}<b>) instead"
                )
        return
    known = per_block | set(space.base_blocks)
    for subset in subsets:
        missing = [b for b in subset if b not in known]
        if missing:
            raise ConfigError(
                f"space.loss.blocks: {subset} needs a weight for block {missing[0]}: "
                f"add {BLOCK_WEIGHT}{missing[0]} to the space"
            )
    unused = sorted(per_block - {b for subset in subsets for b in subset})
    if unused:
        raise ConfigError(
            f"space.{BLOCK_WEIGHT}{unused[0]}: block {unused[0]} is never in loss.blocks {subsets}"
        )
