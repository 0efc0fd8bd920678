"""Command-line options declared once, on the settings dataclasses they fill.

A settings dataclass describes each option in its field's metadata (:func:`option`: help text, flag name,
bounds); :func:`add_options` turns the fields into ``argparse`` options with the dataclass defaults, and
:func:`from_args` builds the dataclass back from the parsed arguments by name. :func:`check_bounds`, called
from the dataclass's ``__post_init__``, rejects an out-of-range value with a one-line
:class:`~ilm_dist.errors.InputError` naming the flag, whether the value came from the command line or
from code.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Literal

from ilm_dist.errors import InputError


def option(
    help: str,
    *,
    flag: str | None = None,
    min: float | None = None,
    above: float | None = None,
    max: float | None = None,
    required: bool = False,
) -> dict[str, Any]:
    """Field metadata: ``min``/``max`` are inclusive bounds, ``above`` an exclusive lower bound;
    ``flag`` replaces the default ``--field-name``; ``required``: the command line must give it."""
    return {"help": help, "flag": flag, "min": min, "above": above, "max": max, "required": required}


def flag_of(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def _cli_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def add_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type) -> None:
    """One option per field of ``cls`` that has :func:`option` metadata."""
    hints = typing.get_type_hints(cls)
    for field in _cli_fields(cls):
        tp = hints[field.name]
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        kwargs: dict[str, Any] = {"dest": field.name, "default": default, "help": field.metadata["help"]}
        if field.metadata["required"]:
            kwargs["required"] = True
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) is Literal:
            kwargs["choices"] = typing.get_args(tp)
        else:
            kwargs["type"] = _scalar_type(tp)
        if default not in (None, "") and tp is not bool:
            kwargs["help"] += f" (default: {default})"
        parser.add_argument(flag_of(field), **kwargs)


def _scalar_type(tp: Any) -> type:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def from_args(cls: type, args: argparse.Namespace, **extra: Any) -> Any:
    """``cls`` built from the parsed options (by field name) and ``extra``."""
    values = {f.name: getattr(args, f.name) for f in _cli_fields(cls)}
    return cls(**values, **extra)


_BOUNDS = {
    "min": (lambda value, bound: value >= bound, ">="),
    "above": (lambda value, bound: value > bound, ">"),
    "max": (lambda value, bound: value <= bound, "<="),
}


def check_bounds(obj: Any) -> None:
    """Raise :class:`InputError` naming the flag for the first field outside its bounds (NaN included)."""
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        if not isinstance(value, int | float) or isinstance(value, bool):
            continue
        for key, (within, relation) in _BOUNDS.items():
            bound = field.metadata.get(key)
            if bound is not None and not within(value, bound):
                raise InputError(f"{flag_of(field)} {value:g}: must be {relation} {bound:g}")
