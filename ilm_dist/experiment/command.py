"""``launch/experiment.py`` / ``ilm-experiment``: run an experiment's cells that are not done, then its report.

Exit status: 0 when every cell is done, 1 when some failed or were blocked (the report then covers what
is complete and lists the rest), 2 for bad input, 130 when interrupted (run the same command again to
continue).
"""

from __future__ import annotations

import contextlib
import logging
import shlex
import signal
import sys
from collections.abc import Iterator

import yaml

from ilm_dist.errors import ArgumentParser, exit_on_input_error
from ilm_dist.experiment.backends import Executor, Scheduler, run_local, run_ray, subprocess_executor
from ilm_dist.experiment.cells import check_saved, log_path, plan
from ilm_dist.experiment.config import Experiment, load_experiment
from ilm_dist.experiment.report import write_report
from ilm_dist.experiment.state import State
from ilm_dist.folder_lock import FolderLock
from ilm_dist.paths import check_output_dir
from ilm_dist.processes import module_command

EXIT_INCOMPLETE = 1
EXIT_INTERRUPTED = 130


def experiment_parser() -> ArgumentParser:
    parser = ArgumentParser(
        description="Pretrain, evaluate and compare methods x seeds x label fractions (configs/experiments/)"
    )
    parser.add_argument("--config", required=True, help="experiment YAML")
    parser.add_argument(
        "--address",
        help="run the cells as tasks on this Ray cluster (host:port, ray://host:port or auto); "
        "default: one after the other on this machine",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print every cell, done or not, and its command"
    )
    parser.add_argument(
        "overrides", nargs="*", help="key=value replacements of the experiment file's keys, e.g. dataset=DIR"
    )
    return parser


def experiment_main(argv: list[str] | None = None) -> None:
    args = experiment_parser().parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with exit_on_input_error():
        code = run_experiment(args.config, args.overrides, args.address, args.dry_run)
    sys.exit(code)


def run_experiment(
    config: str,
    overrides: list[str] = (),
    address: str | None = None,
    dry_run: bool = False,
    execute: Executor | None = None,
) -> int:
    """Run what is not done (``execute``: how one cell runs on this machine, default a child process)."""
    exp = load_experiment(config, overrides)
    check_output_dir(exp.output, "output_dir")
    check_saved(exp)
    cells = plan(exp)
    if dry_run:
        print_plan(exp, cells)
        return 0
    lock = FolderLock(exp.output, "experiment runner (the cells it starts inherit the lock)")
    try:
        (exp.output / "experiment.yaml").write_text(yaml.safe_dump(exp.to_dict(), sort_keys=False))
        state = State(exp.output, exp.name, cells)
        for cell in cells:
            if cell.is_done(state.signature(cell.id)):
                state.mark_done(cell)
        state.save()
        scheduler = Scheduler(cells, state, lambda cell: log_path(exp, cell), exp.output)
        scheduler.report_progress()
        try:
            with sigterm_as_interrupt():
                if address:
                    run_ray(scheduler, address)
                else:
                    run_local(scheduler, execute or subprocess_executor(exp.output, lock.fd))
        except KeyboardInterrupt:
            print(
                f"interrupted: {state.progress_line()}; run the same command again to continue",
                file=sys.stderr,
            )
            return EXIT_INTERRUPTED
        report = write_report(exp, state)
        print(f"report: {report}")
        print(state.progress_line(), file=sys.stderr)
        return 0 if state.counts()["done"] == len(cells) else EXIT_INCOMPLETE
    finally:
        lock.release()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a scheduler stopping the job) stops the running cell and the runner like Ctrl-C."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def print_plan(exp: Experiment, cells) -> None:
    state = State(exp.output, exp.name, cells) if (exp.output / "state.json").is_file() else None
    for cell in cells:
        done = cell.is_done(state.signature(cell.id) if state else None)
        needs = f" (after {', '.join(cell.needs)})" if cell.needs else ""
        print(f"{'done ' if done else 'to do'} {cell.id}{needs}")
        print(f"      {shlex.join(module_command(cell.module_args, cell.resources)[0])}")
