"""Running the cells: one after the other on this machine, or as Ray tasks on a cluster.

Both run the same command line per cell (:func:`ilm_dist.processes.module_command`: one process, or the
``deepspeed`` launcher when the cell's resources have more than one rank), with its output in the cell's
log. A cell runs once every cell it needs is done; a cell that fails (non-zero exit, or an exit without
the files it should write) is recorded with its error and the cells that need it are blocked, the others
go on. On Ray each cell is a task reserving the cell's CPUs and GPUs (``max_retries=0``: a failure is
recorded, the next run of the experiment tries again); the driver keeps the dependencies, so a method's
evaluations start only after its pretraining succeeded. The experiment directory must be on a file system
every Ray node sees.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ilm_dist.errors import InputError
from ilm_dist.experiment.cells import Cell
from ilm_dist.experiment.state import State
from ilm_dist.processes import ResourcesConfig, last_lines, launch, module_command

log = logging.getLogger("ilm_dist.experiment")

TAIL_LINES = 4
HEADER = "=== "  # starts the line a log gets before each attempt: time and command
RAY_POLL_S = 10.0  # progress line refresh while Ray tasks run

# runs one cell's command with its output in the log, returns the exit status
Executor = Callable[[Cell, Path], int]


def run_command(
    module_args: tuple[str, ...], resources: ResourcesConfig, log_path: Path, cwd: Path, pass_fds=()
) -> int:
    """``python -m <module_args>`` (or the deepspeed launcher) on ``resources``; appends to ``log_path``."""
    cmd, env = module_command(module_args, resources)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as out:
        out.write(f"\n{HEADER}{time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
        out.flush()
        with launch(cmd, env, cwd, out, pass_fds) as proc:
            return proc.wait()


def subprocess_executor(cwd: Path, lock_fd: int) -> Executor:
    """Each cell as a child process that inherits the experiment's lock."""
    return lambda cell, log_path: run_command(cell.module_args, cell.resources, log_path, cwd, (lock_fd,))


class Scheduler:
    """The cells still to run, their dependencies and the state file; shared by both backends."""

    def __init__(self, cells: list[Cell], state: State, log_of: Callable[[Cell], Path], output: Path):
        self.cells = {c.id: c for c in cells}
        self.state, self.log_of, self.output = state, log_of, output
        self.waiting = [c.id for c in cells if state.status(c.id) != "done"]

    def ready(self, limit: int | None = None) -> list[Cell]:
        """The first ``limit`` (default: all) waiting cells whose needs are done, in plan order; they leave
        the waiting list."""
        ready = [i for i in self.waiting if all(self._done(n) for n in self.cells[i].needs)][:limit]
        self.waiting = [i for i in self.waiting if i not in ready]
        return [self.cells[i] for i in ready]

    def _done(self, cell_id: str) -> bool:
        return cell_id not in self.cells or self.state.status(cell_id) == "done"

    def start(self, cell: Cell) -> Path:
        path = self.log_of(cell)
        self.state.start(cell, str(path.relative_to(self.output)))
        self.report_progress()
        return path

    def finish(self, cell: Cell, returncode: int) -> None:
        error = None
        if returncode != 0:
            lines = [
                line for line in last_lines(self.log_of(cell), TAIL_LINES + 1) if not line.startswith(HEADER)
            ]
            tail = " | ".join(lines[-TAIL_LINES:])
            error = f"exit status {returncode}: {tail}"
        elif missing := [p for p in cell.outputs if not p.is_file()]:
            error = f"exited 0 without writing {missing[0]}"
        self.state.finish(cell, error, returncode)
        if error:
            log.error("%s failed: %s", cell.id, error)
            self._block_dependents(cell.id)
        self.report_progress()

    def _block_dependents(self, failed: str) -> None:
        blocked = {failed}
        changed = True
        while changed:
            changed = False
            for cell_id in list(self.waiting):
                if blocked & set(self.cells[cell_id].needs):
                    self.state.block(cell_id, f"needs {failed}, which failed")
                    self.waiting.remove(cell_id)
                    blocked.add(cell_id)
                    changed = True

    def interrupted(self, cell: Cell) -> None:
        self.state.interrupted(cell.id)

    def report_progress(self, parallel: int = 1) -> None:
        print(self.state.progress_line(parallel), file=sys.stderr, flush=True)


def run_local(scheduler: Scheduler, execute: Executor) -> None:
    """One cell at a time, the first in plan order whose needs are done (seed by seed, method by method)."""
    while ready := scheduler.ready(limit=1):
        cell = ready[0]
        path = scheduler.start(cell)
        try:
            returncode = execute(cell, path)
        except BaseException:  # Ctrl-C / SIGTERM: the command's group is already stopped
            scheduler.interrupted(cell)
            raise
        scheduler.finish(cell, returncode)


def run_ray(scheduler: Scheduler, address: str) -> None:
    """Every ready cell as a Ray task with its resources; more become ready as tasks finish."""
    import ray

    from ilm_dist.ray_connect import init_ray

    init_ray(address)
    running: dict = {}
    try:
        _check_cluster_fits(scheduler, ray.cluster_resources())
        task = ray.remote(run_command)
        while True:
            for cell in scheduler.ready():
                path = scheduler.start(cell)
                ref = task.options(
                    num_cpus=cell.resources.cpus, num_gpus=cell.resources.gpus, max_retries=0, name=cell.id
                ).remote(cell.module_args, cell.resources, path, scheduler.output)
                running[ref] = cell
            if not running:
                return
            done, _ = ray.wait(list(running), num_returns=1, timeout=RAY_POLL_S)
            for ref in done:
                cell = running.pop(ref)
                try:
                    returncode = ray.get(ref)
                except ray.exceptions.RayError as err:  # the worker died: a failure like any other
                    _append(scheduler.log_of(cell), f"Ray task failed: {str(err).splitlines()[0]}")
                    returncode = -1
                scheduler.finish(cell, returncode)
            if not done:
                scheduler.report_progress(len(running))
    except BaseException:
        for ref, cell in running.items():
            ray.cancel(ref, force=True)
            scheduler.interrupted(cell)
        raise
    finally:
        ray.shutdown()


def _check_cluster_fits(scheduler: Scheduler, resources: dict) -> None:
    """A task asking for more than the cluster has would wait forever: refuse it at the start."""
    for cell in scheduler.cells.values():
        for key, need in (("CPU", cell.resources.cpus), ("GPU", cell.resources.gpus)):
            if need > resources.get(key, 0):
                which = "pretrain" if cell.kind == "pretrain" else "eval"
                raise InputError(
                    f"execution.{which}.{key.lower()}s: {need:g} per {cell.kind} cell, but the Ray cluster has "
                    f"{resources.get(key, 0):g} {key}s in all"
                )


def _append(path: Path, line: str) -> None:
    with path.open("a") as f:
        f.write(line + "\n")
