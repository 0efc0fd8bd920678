"""Entry points of ``launch/finetune.py``, ``launch/probe.py`` and ``launch/analyse.py``.

Fine-tuning and probing run in one process (plain ``python``: CUDA when available, else CPU, no process
group) or data-parallel under the ``deepspeed`` launcher, like pretraining (one rank per GPU, or
``DS_ACCELERATOR=cpu deepspeed --num_gpus N`` for gloo CPU ranks): images are sharded over the ranks
and the results gathered, fine-tuning averages gradients over ranks, rank 0 writes and prints.
``analyse`` only reads saved files: under the launcher rank 0 does the work and the others exit.
Results already saved are reused unless ``--force``. Bad input exits with ``error: ...`` and status 2
(on every rank).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from ilm_dist.config import ConfigError
from ilm_dist.data.manifest import ManifestError
from ilm_dist.distributed import dist_info, shutdown
from ilm_dist.eval.analysis import CkaParams, check_comparable, expand_dirs, load_method, summarise
from ilm_dist.eval.context import EvalContext, init_test_features, open_context
from ilm_dist.eval.errors import EvalError
from ilm_dist.eval.finetune import FRACTIONS, FinetuneSettings, check_batch_size, finetune
from ilm_dist.eval.probe import ProbeSettings, probe
from ilm_dist.eval.report import write_report

log = logging.getLogger("ilm_dist")


def _run(
    main: Callable[[argparse.Namespace], None], parser: argparse.ArgumentParser, argv: list[str] | None
) -> None:
    args = parser.parse_args(argv)
    level = logging.INFO if dist_info().is_main else logging.WARNING  # one log, not one per rank
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        main(args)
    except (EvalError, ConfigError, ManifestError) as err:
        # raised on every rank: input errors are found by all ranks alike, rank 0's by on_main
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    finally:
        shutdown()


def _launcher_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    return parser


def _context_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--weights",
        required=True,
        help="'random', a pretraining run dir, backbone.pt / torchvision state_dict, or a DeepSpeed "
        "checkpoint (run/checkpoints[/step_N])",
    )
    parser.add_argument(
        "--config", help="run config (default: the config.yaml of the run that wrote --weights)"
    )
    parser.add_argument(
        "--out", required=True, help="evaluation directory shared by the methods on one dataset"
    )
    parser.add_argument("--name", help="method name (default: the run's name; 'random_init' for random)")
    parser.add_argument(
        "--seed", type=int, default=0, help="label subsets, shuffling, augmentation, bootstrap"
    )
    parser.add_argument(
        "--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% CIs (0: none)"
    )
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (per rank)")
    parser.add_argument(
        "--eval-batch-size",
        type=int,
        default=128,
        help="inference batch per rank (feature extraction, validation, test)",
    )
    parser.add_argument("--force", action="store_true", help="recompute results that are already saved")
    parser.add_argument(
        "overrides", nargs="*", help="key=value overrides of the run config, e.g. data.shards=DIR"
    )
    return _launcher_args(parser)


def _open(args: argparse.Namespace) -> EvalContext:
    """The context; under the deepspeed launcher this joins its process group (see ``open_context``)."""
    if args.eval_batch_size < 1:
        raise EvalError(f"--eval-batch-size {args.eval_batch_size}: must be >= 1")
    return open_context(
        args.weights,
        args.config,
        args.overrides,
        args.out,
        args.name,
        None,
        args.workers,
        args.eval_batch_size,
    )


def _positive_fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"label fraction {text}: must be in (0, 1]")
    return value


# --------------------------------------------------------------------------- finetune


def finetune_parser() -> argparse.ArgumentParser:
    parser = _context_parser("Fine-tune on labelled fractions of the train split; test metrics with 95% CIs")
    parser.add_argument("--fractions", type=_positive_fraction, nargs="+", default=list(FRACTIONS))
    parser.add_argument(
        "--mode", choices=("full", "linear"), default="full", help="train all layers or fc only"
    )
    defaults = FinetuneSettings()
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--min-steps", type=int, default=defaults.min_steps, help="at least this many steps")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=defaults.batch_size,
        help="global batch, split evenly over the ranks (a multiple of their number)",
    )
    parser.add_argument("--lr", type=float, default=defaults.lr, help="Adam learning rate (official: 1e-3)")
    parser.add_argument(
        "--evals", type=int, default=defaults.evals, help="validation checks (model selection)"
    )
    parser.add_argument("--train-aug", choices=("moco", "none"), default=defaults.train_aug)
    return parser


def _finetune(args: argparse.Namespace) -> None:
    ctx = _open(args)
    check_batch_size(args.batch_size)  # before the first extraction
    settings = FinetuneSettings(
        args.mode,
        args.epochs,
        args.min_steps,
        args.batch_size,
        args.lr,
        args.evals,
        args.train_aug,
        args.seed,
        args.bootstrap,
    )
    if args.mode == "full":
        init_test_features(ctx, args.force)
    for fraction in args.fractions:
        record = finetune(ctx, fraction, settings, args.force)
        if dist_info().is_main:
            print(
                f"{ctx.name} {args.mode} {fraction:g}: test {record['primary']} "
                f"{record['metrics'][record['primary']]:.4f} {record['ci95'].get(record['primary'], '')}"
            )


def finetune_main(argv: list[str] | None = None) -> None:
    _run(_finetune, finetune_parser(), argv)


# --------------------------------------------------------------------------- probe


def probe_parser() -> argparse.ArgumentParser:
    parser = _context_parser("Linear probe on each frozen block's pooled features; test metrics with 95% CIs")
    defaults = ProbeSettings()
    parser.add_argument("--fraction", type=_positive_fraction, default=defaults.fraction)
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--min-steps", type=int, default=defaults.min_steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr, help="Adam learning rate (official: 1e-3)")
    parser.add_argument("--evals", type=int, default=defaults.evals)
    return parser


def _probe(args: argparse.Namespace) -> None:
    ctx = _open(args)
    settings = ProbeSettings(
        args.fraction,
        args.epochs,
        args.min_steps,
        args.batch_size,
        args.lr,
        args.evals,
        args.seed,
        args.bootstrap,
    )
    record = probe(ctx, settings, args.force)
    if not dist_info().is_main:
        return
    for block, result in record["blocks"].items():
        print(
            f"{ctx.name} probe {block}: test {result['primary']} {result['metrics'][result['primary']]:.4f}"
        )


def probe_main(argv: list[str] | None = None) -> None:
    _run(_probe, probe_parser(), argv)


# --------------------------------------------------------------------------- analyse


def analyse_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Report (tables, plots, Markdown) over methods on one dataset"
    )
    parser.add_argument("dirs", nargs="+", help="method directories (EVAL_DIR/<method>) or an EVAL_DIR")
    parser.add_argument("--out", required=True, help="report directory")
    defaults = CkaParams()
    parser.add_argument("--cka-subsets", type=int, default=defaults.num_subsets)
    parser.add_argument("--cka-subset-size", type=int, default=defaults.subset_size)
    parser.add_argument("--rbf-sigma", type=float, default=defaults.sigma)
    parser.add_argument(
        "--rbf-absolute",
        action="store_true",
        help="sigma on raw distances, as the official code (default: sigma x median distance)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="recompute saved CKA values")
    return _launcher_args(parser)


def _analyse(args: argparse.Namespace) -> None:
    if not dist_info().is_main:
        return  # only reads saved files: rank 0 alone, with no process group
    methods = [load_method(path) for path in expand_dirs(args.dirs)]
    check_comparable(methods)
    params = CkaParams(
        args.cka_subsets, args.cka_subset_size, args.rbf_sigma, not args.rbf_absolute, args.seed
    )
    path = write_report(methods, summarise(methods, params, args.force), Path(args.out), params)
    print(f"report: {path}")


def analyse_main(argv: list[str] | None = None) -> None:
    _run(_analyse, analyse_parser(), argv)
