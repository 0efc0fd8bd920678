"""``launch/tune.py``: check the sweep, run it through Ray Tune, write the table, plot and best config."""

from __future__ import annotations

import argparse
import logging
import sys

from ilm_dist.config import ConfigError
from ilm_dist.errors import ArgumentParser, exit_on_input_error
from ilm_dist.paths import check_output_dir
from ilm_dist.ray_connect import init_ray
from ilm_dist.tune import results
from ilm_dist.tune.spec import Sweep, load_sweep
from ilm_dist.tune.sweep import EXPERIMENT, run_sweep

log = logging.getLogger("ilm_dist.tune")


def tune_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description="Ray Tune sweep over run-config keys (see configs/sweeps/)")
    parser.add_argument("--config", required=True, help="sweep YAML")
    parser.add_argument("--output-dir", help="replaces the sweep's output_dir")
    parser.add_argument("--num-samples", type=int, help="replaces the sweep's num_samples")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted sweep in output_dir")
    parser.add_argument(
        "--retry-errored", action="store_true", help="with --resume: run errored trials again"
    )
    parser.add_argument(
        "--address",
        help="an existing Ray cluster: host:port, ray://host:port or auto (default: a local instance)",
    )
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance (default: all)")
    parser.add_argument("--num-gpus", type=int, help="GPUs of the local Ray instance (default: all)")
    parser.add_argument("overrides", nargs="*", help="run-config key=value overrides added to base.overrides")
    return parser


def tune_main(argv: list[str] | None = None) -> None:
    args = tune_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with exit_on_input_error():
        sweep = load_sweep(
            args.config, args.overrides, output_dir=args.output_dir, num_samples=args.num_samples
        )
        _check_output(sweep, args.resume)
        init_ray(args.address, args.num_cpus, args.num_gpus)
    run_sweep(sweep, resume=args.resume, retry_errored=args.retry_errored)
    sys.exit(write_outputs(sweep))


def _check_output(sweep: Sweep, resume: bool) -> None:
    check_output_dir(sweep.output, "output_dir")
    if (sweep.output / EXPERIMENT).exists() and not resume:
        raise ConfigError(f"output_dir: {sweep.output} holds a sweep; pass --resume to continue it")


def write_outputs(sweep: Sweep) -> int:
    """results.csv, results.png and best.yaml in the sweep's output_dir; 1 when the sweep is cut short
    or no trial has a result."""
    records = results.collect(sweep.output / EXPERIMENT, sweep)
    df = results.table(records, sweep)
    df.to_csv(sweep.output / "results.csv", index=False)
    results.plot(df, sweep, sweep.output / "results.png")
    shown = [c for c in df.columns if c not in ("error", "run_dir")]
    print(df[shown].to_string(index=False))
    for row in df[df["status"] == "error"].itertuples():
        print(f"trial {row.trial_id} failed: {row.error}")
    unfinished = int((df["status"] == "unfinished").sum())
    if unfinished:
        print(f"error: {unfinished} trials did not finish; continue the sweep with --resume", file=sys.stderr)
        return 1
    best = results.best(records, sweep)
    if best is None:
        print(
            f"error: no trial reported {sweep.settings.metric}; see {sweep.output / 'results.csv'}",
            file=sys.stderr,
        )
        return 1
    results.export_best(best, sweep, sweep.output / "best.yaml")
    print(f"best trial {best.trial_id}; its run config: {sweep.output / 'best.yaml'}")
    return 0
