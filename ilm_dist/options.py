"""Command-line options declared once, on the settings dataclasses they fill.

A settings dataclass describes each option in its field's metadata (:func:`option`: help text, flag name,
bounds); :func:`add_options` turns the fields into ``argparse`` options (their help shows the dataclass
defaults; an option not given stays out of the parsed namespace), :func:`given_options` returns the
options given on the command line, and :func:`from_args` builds the dataclass back from them by name,
over the dataclass defaults or other defaults (an evaluation protocol's). :func:`check_bounds`, called
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
    """One option per field of ``cls`` that has :func:`option` metadata; one not given is left out of the
    namespace (``argparse.SUPPRESS``), so :func:`given_options` can tell it from a given default."""
    hints = typing.get_type_hints(cls)
    for field in _cli_fields(cls):
        tp = hints[field.name]
        default = _default(field)
        kwargs: dict[str, Any] = {
            "dest": field.name,
            "default": argparse.SUPPRESS,
            "help": field.metadata["help"],
        }
        if field.metadata["required"]:
            kwargs["required"] = True
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) is Literal:
            kwargs["choices"] = typing.get_args(tp)
        else:
            kwargs["type"] = _scalar_type(tp)
        if default not in (None, ""):
            kwargs["help"] += f" (default: {default})"
        parser.add_argument(flag_of(field), **kwargs)


def _default(field: dataclasses.Field) -> Any:
    return field.default if field.default is not dataclasses.MISSING else field.default_factory()


def _scalar_type(tp: Any) -> type:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def given_options(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The options of ``cls`` given on the command line, by field name."""
    return {f.name: getattr(args, f.name) for f in _cli_fields(cls) if hasattr(args, f.name)}


def from_args(
    cls: type, args: argparse.Namespace, defaults: dict[str, Any] | None = None, **extra: Any
) -> Any:
    """``cls`` from the options given on the command line, over ``defaults`` (by field name), over the
    dataclass defaults; ``extra`` fills fields that are not options."""
    return cls(**{**(defaults or {}), **given_options(cls, args), **extra})


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
