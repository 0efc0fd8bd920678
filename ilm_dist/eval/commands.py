"""Entry points of ``launch/finetune.py``, ``launch/probe.py`` and ``launch/analyse.py``.

Fine-tuning and probing run in one process (plain ``python``: CUDA when available, else CPU, no process
group) or data-parallel under the ``deepspeed`` launcher, like pretraining (one rank per GPU, or
``DS_ACCELERATOR=cpu deepspeed --num_gpus N`` for gloo CPU ranks): images are sharded over the ranks
and the results gathered, fine-tuning averages gradients over ranks, rank 0 writes and prints.
``analyse`` only reads saved files: under the launcher rank 0 does the work and the others exit.
Results already saved are reused unless ``--force``. Bad input exits with ``error: ...`` and status 2
(on every rank).

Every option is declared once, on the settings dataclass it fills (:mod:`ilm_dist.options`):
:class:`~ilm_dist.eval.context.EvalTarget`, :class:`~ilm_dist.eval.settings.FinetuneSettings`,
:class:`~ilm_dist.eval.settings.ProbeSettings`, :class:`~ilm_dist.eval.settings.CkaParams`. ``--protocol``
(:mod:`ilm_dist.eval.protocol`) sets the defaults of the last three; a flag on the command line wins.
``analyse`` takes the protocol the methods were evaluated under, and refuses a ``--protocol`` that differs.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path

from ilm_dist.distributed import dist_info, shutdown
from ilm_dist.errors import ArgumentParser, exit_on_input_error
from ilm_dist.eval.analysis import check_comparable, check_protocol, expand_dirs, load_method, summarise
from ilm_dist.eval.context import EvalContext, EvalTarget, init_test_features, open_context
from ilm_dist.eval.finetune import FRACTIONS, check_batch_size, finetune
from ilm_dist.eval.probe import probe
from ilm_dist.eval.protocol import settings_from_args
from ilm_dist.eval.report import write_report
from ilm_dist.eval.settings import CkaParams, FinetuneSettings, ProbeSettings
from ilm_dist.options import add_options, from_args
from ilm_dist.paths import check_output_dir

log = logging.getLogger("ilm_dist")


def _run(main: Callable[[argparse.Namespace], None], parser: ArgumentParser, argv: list[str] | None) -> None:
    args = parser.parse_intermixed_args(argv)  # key=value overrides anywhere on the line
    level = logging.INFO if dist_info().is_main else logging.WARNING  # one log, not one per rank
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        # raised on every rank: input errors are found by all ranks alike, rank 0's by on_main
        with exit_on_input_error():
            main(args)
    finally:
        shutdown()


def _parser(description: str, *settings: type) -> ArgumentParser:
    parser = ArgumentParser(description=description)
    for cls in settings:
        add_options(parser, cls)
    parser.add_argument("--force", action="store_true", help="recompute results that are already saved")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    return parser


def _evaluation_parser(description: str, settings: type) -> ArgumentParser:
    parser = _parser(description, EvalTarget, settings)
    parser.add_argument(
        "overrides", nargs="*", help="key=value overrides of the run config, e.g. data.shards=DIR"
    )
    return parser


def _open(args: argparse.Namespace) -> EvalContext:
    """The context; under the deepspeed launcher this joins its process group (see ``open_context``)."""
    return open_context(from_args(EvalTarget, args, overrides=args.overrides))


def _positive_fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"label fraction {text}: must be in (0, 1]")
    return value


# --------------------------------------------------------------------------- finetune


def finetune_parser() -> ArgumentParser:
    parser = _evaluation_parser(
        "Fine-tune on labelled fractions of the train split; test metrics with 95% CIs", FinetuneSettings
    )
    parser.add_argument("--fractions", type=_positive_fraction, nargs="+", default=list(FRACTIONS))
    return parser


def _finetune(args: argparse.Namespace) -> None:
    from_args(FinetuneSettings, args)  # checks the flags' values before any work
    ctx = _open(args)
    settings = settings_from_args(ctx.protocol, "finetune", args)
    check_batch_size(settings.batch_size)  # before the first extraction
    if settings.mode == "full":
        init_test_features(ctx, args.force)
    for fraction in args.fractions:
        record = finetune(ctx, fraction, settings, args.force)
        if dist_info().is_main:
            print(
                f"{ctx.name} {settings.mode} {fraction:g}: test {record['primary']} "
                f"{record['metrics'][record['primary']]:.4f} {record['ci95'].get(record['primary'], '')}"
            )


def finetune_main(argv: list[str] | None = None) -> None:
    _run(_finetune, finetune_parser(), argv)


# --------------------------------------------------------------------------- probe


def probe_parser() -> ArgumentParser:
    return _evaluation_parser(
        "Linear probe on each frozen block's pooled features; test metrics with 95% CIs", ProbeSettings
    )


def _probe(args: argparse.Namespace) -> None:
    from_args(ProbeSettings, args)  # checks the flags' values before any work
    ctx = _open(args)
    record = probe(ctx, settings_from_args(ctx.protocol, "probe", args), args.force)
    if not dist_info().is_main:
        return
    for block, result in record["blocks"].items():
        print(
            f"{ctx.name} probe {block}: test {result['primary']} {result['metrics'][result['primary']]:.4f}"
        )


def probe_main(argv: list[str] | None = None) -> None:
    _run(_probe, probe_parser(), argv)


# --------------------------------------------------------------------------- analyse


def analyse_parser() -> ArgumentParser:
    parser = _parser("Report (tables, plots, Markdown) over methods on one dataset", CkaParams)
    parser.add_argument("dirs", nargs="+", help="method directories (EVAL_DIR/<method>) or an EVAL_DIR")
    parser.add_argument("--out", required=True, help="report directory")
    parser.add_argument(
        "--protocol",
        default=None,
        help="the evaluation protocol the methods must have been evaluated under (default: the one they "
        "record); its CKA settings are the defaults",
    )
    return parser


def _analyse(args: argparse.Namespace) -> None:
    if not dist_info().is_main:
        return  # only reads saved files: rank 0 alone, with no process group
    from_args(CkaParams, args)  # checks the flags' values before any work
    check_output_dir(args.out, "--out")
    methods = [load_method(path) for path in expand_dirs(args.dirs)]
    check_comparable(methods)
    protocol = check_protocol(methods, args.protocol)
    params = settings_from_args(protocol, "cka", args)
    path = write_report(methods, summarise(methods, params, args.force), Path(args.out), params)
    print(f"report: {path}")


def analyse_main(argv: list[str] | None = None) -> None:
    _run(_analyse, analyse_parser(), argv)
